"""The ``tunecv`` command line: argument parsing only, no logic of its own.

Subcommands: ``run`` (the search; resumes an unfinished run), ``retrain`` (a search on a
new data snapshot, gated and registered in MLflow), ``submit`` (the search as a Ray job),
``report`` and ``export`` (read a run), ``evaluate`` (a checkpoint, on N workers),
``train`` (one configuration), ``data digits|synthetic`` (demo image folders), ``data pack``
(a run's data as Parquet shards for Ray Data).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.jobs.train import train

    cfg = load_config(args.config, args.set)
    train(cfg)
    return 0


def _run(args: argparse.Namespace) -> int:
    from search.config import ConfigError, load_config
    from search.storage import RunStore, read_config

    if args.resume:
        if args.config or args.set or args.space or args.run_dir:
            raise ConfigError("--resume RUN_DIR takes the run's own config; drop --config/--set/--space/--run-dir.")
        cfg, run_dir = read_config(RunStore.at(args.resume)), args.resume
    elif not args.config:
        raise ConfigError("tunecv run needs --config FILE (or --resume RUN_DIR).")
    else:
        overrides = list(args.set) + ([f"search.space={args.space}"] if args.space else [])
        cfg, run_dir = load_config(args.config, overrides), args.run_dir
    from search.run.driver import run_search  # imports Ray Tune (seconds): after a bad config is refused

    run_search(cfg, run_dir=run_dir)
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.retrain.job import retrain

    retrain(load_config(args.config, args.set))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from search.jobs.submit import submit

    return submit(
        args.config, args.address, args.set, runtime_env=Path(args.runtime_env),
        run_dir=args.run_dir, wait=args.wait,
    )


def _report(args: argparse.Namespace) -> int:
    from search.layout import GATE_MARKDOWN, REPORT_HTML, REPORT_MARKDOWN
    from search.results.report import build_report
    from search.results.table import format_table
    from search.results.trials import load_run
    from search.storage import RunStore

    store = RunStore.at(args.run_dir)
    _check_search_run(store)
    report = build_report(load_run(store))
    print(format_table(report.rows) if report.rows else f"no trials yet in {store}")
    if store.exists(GATE_MARKDOWN):  # a retrain's run: the champion/challenger decision
        print(store.read_text(GATE_MARKDOWN))
    if args.out:
        report.write_to(RunStore.at(args.out))
        print(f"report: {Path(args.out) / REPORT_MARKDOWN}, {Path(args.out) / REPORT_HTML} (opens offline)")
    return 0


def _check_search_run(store) -> None:
    """A report needs a run that searched, or is searching: say so for anything else."""
    from search.config import ConfigError
    from search.drivers import live_driver
    from search.layout import SPACE
    from search.run.location import require_search_run

    drivers = require_search_run(store)
    if not store.exists(SPACE) and live_driver(drivers) is None:
        raise ConfigError(f"run '{store}' never started searching: its driver stopped during the set-up, "
                          "before any trial. Start a new run.")


def _export(args: argparse.Namespace) -> int:
    from search.results.winner import describe_int8, export_trial
    from search.storage import RunStore

    store = RunStore.at(args.run_dir)
    out = _out_dir(args.out or f"export-{store.name}" + (f"-{args.trial}" if args.trial else ""), args.overwrite,
                   "the bundle")
    result = export_trial(store, out, args.trial, int8=_int8_config(args))
    print(f"exported {result.onnx_path} (ONNX macro-F1 {result.onnx_macro_f1:.4f})")
    if result.int8:
        print(describe_int8(result.int8))
    return 0


def _int8_config(args: argparse.Namespace):
    """The ``--int8*`` options as an ``Int8Config`` (None without ``--int8``), checked before any work."""
    from pydantic import ValidationError

    from search.config import ConfigError, Int8Config

    flags = {"calibration_images": "--int8-images", "method": "--int8-method", "max_drop": "--int8-max-drop"}
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in flags.items()}
    given = {field: value for field, value in given.items() if value is not None}
    if not args.int8:
        if given:
            raise ConfigError(f"{', '.join(flags[f] for f in given)} need --int8.")
        return None
    try:
        return Int8Config(**given)
    except ValidationError as err:
        raise ConfigError("; ".join(f"{flags[e['loc'][0]]}: {e['msg']}" for e in err.errors())) from err


def _evaluate(args: argparse.Namespace) -> int:
    from search.jobs.evaluate import evaluate_checkpoint
    from trainables.training.metrics import RANKING_METRIC

    m = evaluate_checkpoint(
        args.checkpoint, args.split, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.gpu, storage=args.storage,
    )
    print(f"{RANKING_METRIC} {m[RANKING_METRIC]:.4f}  accuracy {m['accuracy']:.4f}  "
          f"balanced accuracy {m['balanced_accuracy']:.4f}  ({m['world_size']} worker(s))")
    return 0


def _out_dir(out: str, overwrite: bool, what: str) -> Path:
    """A command's OUT: new, empty, or ``--overwrite`` given; never a file. Checked
    before any work, so a refusal loses nothing and overwrites nothing."""
    from search.config import ConfigError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"OUT '{path}' is a file; give a directory to write {what} into.")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"OUT '{path}' is not empty ({len(entries)} entries: {shown}); nothing was written. "
                          "Give a new or empty directory, or --overwrite to replace files of the same names.")
    return path


def _demo_data(write, args: argparse.Namespace, **kwargs) -> dict[str, int]:
    """``write(OUT, **kwargs)``, with an out-of-range argument reported as the user's error."""
    from search.config import ConfigError

    out = _out_dir(args.out, args.overwrite, "the image folders")
    try:
        return write(out, **kwargs)
    except ValueError as err:
        raise ConfigError(f"data {args.dataset}: {err}") from None


def _data_digits(args: argparse.Namespace) -> int:
    from trainables.data.demo_data import write_digits

    counts = _demo_data(write_digits, args, image_size=args.image_size)
    print(f"wrote {sum(counts.values())} digit images in {len(counts)} classes to {args.out}")
    return 0


def _data_synthetic(args: argparse.Namespace) -> int:
    from trainables.data.demo_data import write_synthetic

    counts = _demo_data(write_synthetic, args, num_classes=args.num_classes, image_size=args.image_size,
                        images_per_class=args.images_per_class, seed=args.seed)
    print(f"wrote {sum(counts.values())} synthetic images in {len(counts)} classes to {args.out}")
    return 0


def _data_pack(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.jobs.pack import pack_dataset

    pack_dataset(load_config(args.config, args.set), args.out, rows_per_file=args.rows_per_file)
    return 0


def _search_args(parser: argparse.ArgumentParser, config_required: bool) -> None:
    """The arguments ``run`` and ``submit`` share: the run file, overrides, the run directory."""
    parser.add_argument("--config", required=config_required, help="run YAML file (relative, for submit)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set optim.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run directory, path or URI (default: OUTPUT_DIR/NAME-TIME); "
                                          "resumed if it holds a run")


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

    run = sub.add_parser(
        "run", help="search, rank on macro-F1, export the winner",
        description="Search. An unfinished run of the same name and config is resumed.",
    )
    _search_args(run, config_required=False)
    run.add_argument("--space", help="search space: a name in spaces/, a YAML path, or 'auto'")
    run.add_argument("--resume", metavar="RUN_DIR", help="resume this run with its own config")
    run.set_defaults(func=_run)

    retrain = sub.add_parser(
        "retrain", help="search a new data snapshot, gate it against the champion, register it in MLflow",
        description="One scheduled retrain, driven by the run file's `retrain:` section. The same snapshot "
                    "twice trains nothing; a second retrain of the same model while one runs refuses.",
    )
    retrain.add_argument("--config", required=True, help="run YAML file with a `retrain:` section")
    retrain.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value, e.g. --set retrain.snapshot=/data/2026-11-30")
    retrain.set_defaults(func=_retrain)

    submit = sub.add_parser("submit", help="submit a search to a Ray cluster as a job")
    _search_args(submit, config_required=True)
    submit.add_argument("--address", default="http://127.0.0.1:8265",
                        help="the cluster's dashboard, e.g. through `ray dashboard` or kubectl port-forward")
    submit.add_argument("--runtime-env", default="cluster/runtime_env.yaml")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its log tail")
    submit.set_defaults(func=_submit)

    report = sub.add_parser("report", help="build and print the ranked report of a run, also mid-run")
    report.add_argument("run_dir", help="a run directory, or its URI (s3://..., gs://...)")
    report.add_argument("--out", help="also write report.md, report.html and report.parquet into this local directory "
                        "(the run's own copies are written once, by the driver that finishes it)")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="export a run's winner (or --trial) to a verified ONNX bundle")
    export.add_argument("run_dir", help="a run directory, or its URI")
    export.add_argument("--trial", help="trial id (default: the top-ranked trial)")
    export.add_argument("--out", help="a new or empty local directory for the bundle (default: ./export-RUN[-TRIAL])")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (a previous export), "
                                                                 "replacing files of the same names")
    export.add_argument("--int8", action="store_true",
                        help="also a static int8 model (model.int8.onnx), shipped only if it passes the accuracy gate")
    export.add_argument("--int8-images", type=int, help="training images to calibrate on (default 256)")
    export.add_argument("--int8-method", help="calibration: minmax (default), entropy or percentile")
    export.add_argument("--int8-max-drop", type=float,
                        help="macro-F1 points int8 may lose against fp32 and still ship (default 0.5)")
    export.set_defaults(func=_export)

    evaluate = sub.add_parser("evaluate", help="a checkpoint's metrics on a split's validation images")
    evaluate.add_argument("checkpoint", help="checkpoint directory (path or URI), "
                                             "e.g. RUN/tune/001/t0003/checkpoint_000002")
    evaluate.add_argument("--split", required=True, help="split file (path or URI), e.g. RUN/split.parquet")
    evaluate.add_argument("--storage", help="where Ray Train keeps the evaluation run (default: a temporary directory)")
    evaluate.add_argument("--workers", type=int, default=1, help="Ray Train workers (shards)")
    evaluate.add_argument("--cpus-per-worker", type=float, default=1.0)
    evaluate.add_argument("--gpu", action="store_true")
    evaluate.set_defaults(func=_evaluate)

    from trainables.data.packs import ROWS_PER_FILE

    data = sub.add_parser("data", help="write demo data as an image folder, or pack a run's data").add_subparsers(
        dest="dataset", required=True
    )
    digits = data.add_parser("digits", help="scikit-learn's 1,797 handwritten digits")
    synth = data.add_parser("synthetic", help="a learnable synthetic set for smoke tests")
    for command in (digits, synth):
        command.add_argument("out", help="a new or empty directory")
        command.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing "
                                                                      "files of the same names")
    digits.add_argument("--image-size", type=int, default=64)
    digits.set_defaults(func=_data_digits)
    synth.add_argument("--num-classes", type=int, default=4)
    synth.add_argument("--images-per-class", type=int, default=30)
    synth.add_argument("--image-size", type=int, default=48)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synthetic)
    pack = data.add_parser("pack", help="a run file's data and split as Parquet shards, for data.loader: ray_data")
    pack.add_argument("out", help="a new or empty directory or bucket prefix (s3://bucket/packs/digits)")
    pack.add_argument("--config", required=True, help="run YAML file: its data section and optim.seed make the split")
    pack.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a config value, e.g. --set data.root=data/digits (repeatable)")
    pack.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE,
                      help=f"images per Parquet file (default {ROWS_PER_FILE}); a trial's rank streams whole files")
    pack.set_defaults(func=_data_pack)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one tunecv line on stderr: Python's default adds its source file and
    line (``datasets.py:373: UserWarning`` and the code), which is for us, not a user."""
    print(f"tunecv: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from search.console import escaped_console, escaped_excepthook

    sys.excepthook = escaped_excepthook  # a traceback is printed after the block below
    with escaped_console():  # user-named text never drives the terminal (search/console.py)
        args = build_parser().parse_args(argv)
        warnings.showwarning = _warning_line
        return _dispatch(args)


def _dispatch(args) -> int:
    """``args.func(args)``, with input problems and a full disk as one line and an exit code."""
    from search.config import ConfigError
    from search.export.bundle import ExportError
    from search.results.winner import NothingToExportError
    from search.space.model import SpaceError
    from search.storage import RunStorageFullError, out_of_space
    from trainables.model.backbones import PretrainedWeightsError
    from trainables.data.layouts import DataError

    try:
        return args.func(args)
    except (ConfigError, SpaceError, DataError, PretrainedWeightsError, NothingToExportError, ExportError) as err:
        # Input problems get their message alone: the traceback would only bury the fix.
        print(f"tunecv: error: {err}", file=sys.stderr)
        return 2
    except RunStorageFullError as err:  # not the input's fault, and nothing to debug
        print(f"tunecv: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if (full := out_of_space(err)) is None:
            raise
        # A full disk outside the search itself (the run's set-up, the report).
        print(f"tunecv: error: no space left on the device ({full}); free space and run the command again "
              "(a search continues with `tunecv run --resume RUN`).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
