"""``tunecv train``: one configuration on this machine's disk, no search. In-process
(``scaling.num_workers: 0``) ``LocalRunReporter`` keeps ``metrics.jsonl``, ``best/`` and
``last/``; with workers, Ray Train keeps its checkpoints in ``train/`` and the best is
copied to ``best/`` at the end.
"""

from __future__ import annotations

from pathlib import Path

from search.config import ConfigError, RunConfig, dump_config
from search.data import check_batch_sizes, scan_data
from search.layout import CONFIG, SPLIT
from search.run.location import new_run
from search.storage import RunStore
from trainables.data.datasets import DataSplit
from trainables.data.split_files import write_split
from trainables.data.locations import is_uri
from trainables.training.metrics import RANKING_METRIC
from trainables.training.reporting import BEST_DIR


def train(cfg: RunConfig, print_fn=print) -> Path:
    """Train one configuration and return its run directory.

    Raises:
        trainables.data.layouts.DataError: The data cannot produce a usable split (before any training
            and before the run directory exists).
        ConfigError: ``output_dir`` is an object-store URI (one training run writes locally), or
            ``optim.batch_size`` is larger than the training set.
    """
    if is_uri(cfg.output_dir):
        raise ConfigError(
            f"output_dir '{cfg.output_dir}': tunecv train writes a local run directory; give a "
            "path (object-store URIs are for tunecv run)."
        )
    split = scan_data(cfg, print_fn)  # checked before the run directory exists
    check_batch_sizes(cfg, len(split.train))
    store = new_run(cfg)
    store.write_text(CONFIG, dump_config(cfg))
    run_dir = Path(store.location)
    print_fn(f"run directory: {run_dir}")
    write_split(split, str(run_dir / SPLIT))
    if cfg.scaling.num_workers == 0:
        if cfg.data.loader == "ray_data":
            from search.ray_session import connect_ray

            connect_ray()  # Ray Data's tasks decode the pack
        _train_in_process(cfg, split, run_dir, print_fn)
    else:
        _train_with_ray(cfg, run_dir, print_fn)
    return run_dir


def _train_in_process(cfg: RunConfig, split: DataSplit, run_dir: Path, print_fn) -> None:
    from trainables.training.loop import run_trial
    from trainables.training.reporting import LocalRunReporter
    from trainables.runtime.ranks import local_runtime

    reporter = LocalRunReporter(run_dir, print_fn)
    summary = run_trial(cfg.trial(), split, reporter, local_runtime(cfg.scaling.use_gpu))
    print_fn(
        f"model: {cfg.model.backbone}, {summary.num_params:,} parameters "
        f"({summary.trainable_params:,} trainable)"
    )
    print_fn(reporter.final_report())
    print_fn(f"best checkpoint: {run_dir / BEST_DIR}")


def _train_with_ray(cfg: RunConfig, run_dir: Path, print_fn) -> None:
    from search.ray_session import connect_ray
    from search.run.runners import create_torch_trainer

    connect_ray()
    result = create_torch_trainer(cfg.trial(), str(run_dir / SPLIT), RunStore.at(run_dir)).fit()
    if result.best_checkpoints:
        best, _ = max(result.best_checkpoints, key=lambda pair: pair[1][RANKING_METRIC])
        best.to_directory(str(run_dir / BEST_DIR))
    m = result.metrics
    print_fn(f"last epoch {m['epoch']}: {RANKING_METRIC} {m[RANKING_METRIC]:.4f}, accuracy {m['accuracy']:.4f}")
    print_fn(f"best checkpoint: {run_dir / BEST_DIR}")
