"""The ``tunecv`` command line: argument parsing only, no logic of its own.

Subcommands: ``run`` (the search), ``report`` and ``export`` (on a run directory),
``train`` (one configuration), ``data digits`` / ``data synthetic`` (write the bundled
demo data or a synthetic set as an image folder).
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


def _run(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.driver import run_search

    overrides = list(args.set) + ([f"search.space={args.space}"] if args.space else [])
    run_search(load_config(args.config, overrides))
    return 0


def _report(args: argparse.Namespace) -> int:
    from search.report import REPORT_MARKDOWN, format_table, write_report

    run_dir = _existing_run_dir(args.run_dir)
    _, rows = write_report(run_dir)
    print(format_table(rows))
    print(f"report: {run_dir / REPORT_MARKDOWN}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from search.winner import export_run

    result = export_run(_existing_run_dir(args.run_dir), args.trial)
    print(f"exported {result.onnx_path} (ONNX macro-F1 {result.onnx_macro_f1:.4f})")
    return 0


def _existing_run_dir(path: str) -> Path:
    from search.config import ConfigError

    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{path}' is not a tunecv run directory (no config.yaml in it).")
    return run_dir


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

    run = sub.add_parser("run", help="search, rank on macro-F1, export the winner")
    run.add_argument("--config", required=True, help="run YAML file")
    run.add_argument("--space", help="search space: a name in spaces/, a YAML path, or 'auto'")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="rebuild and print the ranked report of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="export a run's winner (or --trial) to ONNX")
    export.add_argument("run_dir")
    export.add_argument("--trial", help="trial id (default: the top-ranked trial)")
    export.set_defaults(func=_export)

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
    from search.space import SpaceError
    from search.winner import NothingToExportError
    from trainables.backbones import PretrainedWeightsError
    from trainables.layouts import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SpaceError, DataError, PretrainedWeightsError, NothingToExportError) as err:
        # Input problems get their message alone: the traceback would only bury the fix.
        print(f"tunecv: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
