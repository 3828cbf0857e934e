"""``tunecv train``: one configuration, outside any search.

Owns the run directory of a single training job: the scanned, fixed data split
(``split.parquet``), the resolved config, per-epoch metrics and the best/last
checkpoints. It chooses where the loop runs: in this process for
``scaling.num_workers: 0``, or in a Ray Train ``TorchTrainer`` worker group (DDP)
otherwise. The loop itself lives in ``trainables/``.
"""

from __future__ import annotations

import time
from pathlib import Path

from search.config import RunConfig, dump_config
from search.records import CONFIG_FILE, SPLIT_FILE
from trainables.datasets import DataSplit, prepare_split, write_split
from trainables.metrics import RANKING_METRIC

_MAX_LISTED_BAD_FILES = 20


def run_dir_name(cfg: RunConfig) -> str:
    """``name-YYYYmmdd-HHMMSS``: sorts by start time."""
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg: RunConfig) -> Path:
    """``output_dir/name-YYYYmmdd-HHMMSS`` on a local path, not yet taken."""
    name = run_dir_name(cfg)
    run_dir = (Path(cfg.output_dir) / name).resolve()
    suffix = 1
    while run_dir.exists():  # two runs in the same second must not share a directory
        run_dir = run_dir.with_name(f"{name}-{suffix}")
        suffix += 1
    return run_dir


def create_run_dir(cfg: RunConfig, run_dir: Path | None = None) -> Path:
    """Create ``run_dir`` (default: a new ``output_dir/name-<time>``) holding the resolved config."""
    run_dir = (run_dir or new_run_dir(cfg)).resolve()
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(cfg))
    return run_dir


def prepare_data(cfg: RunConfig, run_dir: Path, print_fn=print) -> DataSplit:
    """Scan and split the data once, write the split into the run directory, summarise."""
    split = prepare_split(
        cfg.data.root,
        manifest=cfg.data.manifest,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.optim.seed,
        strict=cfg.data.strict,
        max_pixels=cfg.data.max_image_pixels,
    )
    write_split(split, run_dir / SPLIT_FILE)
    print_fn(describe_split(split))
    return split


def describe_split(split: DataSplit) -> str:
    """Counts per class and split, and every skipped file with its reason."""
    train, val = split.class_counts("train"), split.class_counts("val")
    lines = [
        f"data: {len(split.train)} train / {len(split.val)} val images, "
        f"{len(split.class_names)} classes, fingerprint {split.fingerprint()[:12]}"
    ]
    for name, n_train, n_val in zip(split.class_names, train, val):
        lines.append(f"  {name}: {n_train} train, {n_val} val")
    if split.bad_files:
        lines.append(f"skipped {len(split.bad_files)} bad file(s):")
        for bad in split.bad_files[:_MAX_LISTED_BAD_FILES]:
            lines.append(f"  {bad.path}: {bad.reason}")
        if len(split.bad_files) > _MAX_LISTED_BAD_FILES:
            lines.append(f"  ... and {len(split.bad_files) - _MAX_LISTED_BAD_FILES} more (see split.json)")
    return "\n".join(lines)


def train(cfg: RunConfig, print_fn=print) -> Path:
    """Train one configuration and return its run directory.

    Raises:
        trainables.layouts.DataError: The data cannot produce a usable split (before any training).
        ConfigError: ``output_dir`` is an object-store URI (one training run writes locally).
    """
    from search.config import ConfigError
    from trainables.mirror import is_uri

    if is_uri(cfg.output_dir):
        raise ConfigError(
            f"output_dir '{cfg.output_dir}': tunecv train writes a local run directory; give a "
            "path (object-store URIs are for tunecv run)."
        )
    run_dir = create_run_dir(cfg)
    print_fn(f"run directory: {run_dir}")
    split = prepare_data(cfg, run_dir, print_fn)
    if cfg.scaling.num_workers == 0:
        _train_in_process(cfg, split, run_dir, print_fn)
    else:
        _train_with_ray(cfg, run_dir, print_fn)
    return run_dir


def _train_in_process(cfg: RunConfig, split: DataSplit, run_dir: Path, print_fn) -> None:
    from trainables.loop import run_trial
    from trainables.reporting import ConsoleReporter
    from trainables.runtime import local_runtime

    reporter = ConsoleReporter(run_dir, print_fn)
    summary = run_trial(cfg.trial(), split, reporter, local_runtime(cfg.scaling.use_gpu))
    print_fn(
        f"model: {cfg.model.backbone}, {summary.num_params:,} parameters "
        f"({summary.trainable_params:,} trainable)"
    )
    print_fn(reporter.final_report())
    print_fn(f"best checkpoint: {run_dir / 'best'}")


def _train_with_ray(cfg: RunConfig, run_dir: Path, print_fn) -> None:
    import ray
    import ray.train

    from search.trial import create_torch_trainer

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set (ray job submit), else starts a local Ray
    trainer = create_torch_trainer(
        cfg.trial(),
        run_dir / SPLIT_FILE,
        run_dir,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=RANKING_METRIC, checkpoint_score_order="max"
        ),
    )
    result = trainer.fit()
    if result.best_checkpoints:
        best, _ = max(result.best_checkpoints, key=lambda pair: pair[1][RANKING_METRIC])
        best.to_directory(str(run_dir / "best"))
    m = result.metrics
    print_fn(f"last epoch {m['epoch']}: {RANKING_METRIC} {m[RANKING_METRIC]:.4f}, accuracy {m['accuracy']:.4f}")
    print_fn(f"best checkpoint: {run_dir / 'best'}")
