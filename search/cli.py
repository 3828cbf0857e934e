"""The ``tunecv`` command line: argument parsing only, no logic of its own.

Subcommands: ``train`` (one configuration), ``data digits`` / ``data synthetic``
(write the bundled demo data or a synthetic set as an image folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.train_job import train

    cfg = load_config(args.config, args.set)
    train(cfg)
    return 0


def _data_digits(args: argparse.Namespace) -> int:
    from trainables.demo_data import write_digits

    counts = write_digits(Path(args.out), image_size=args.image_size)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} classes to {args.out}")
    return 0


def _data_synthetic(args: argparse.Namespace) -> int:
    from trainables.demo_data import write_synthetic

    counts = write_synthetic(
        Path(args.out),
        num_classes=args.num_classes,
        images_per_class=args.images_per_class,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote {sum(counts.values())} synthetic images in {len(counts)} classes to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunecv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune one configuration")
    train.add_argument("--config", required=True, help="run YAML file")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set optim.epochs=3 (repeatable)",
    )
    train.set_defaults(func=_train)

    data = sub.add_parser("data", help="write demo data as an image folder").add_subparsers(
        dest="dataset", required=True
    )
    digits = data.add_parser("digits", help="scikit-learn's 1,797 handwritten digits")
    digits.add_argument("out")
    digits.add_argument("--image-size", type=int, default=64)
    digits.set_defaults(func=_data_digits)
    synth = data.add_parser("synthetic", help="a learnable synthetic set for smoke tests")
    synth.add_argument("out")
    synth.add_argument("--num-classes", type=int, default=4)
    synth.add_argument("--images-per-class", type=int, default=30)
    synth.add_argument("--image-size", type=int, default=48)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    from search.config import ConfigError
    from trainables.backbones import PretrainedWeightsError
    from trainables.datasets import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, PretrainedWeightsError) as err:
        # Input problems get their message alone: the traceback would only bury the fix.
        print(f"tunecv: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
