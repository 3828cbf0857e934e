"""``tunecv run``: the search, from a validated config to a ranked report and an export.

Owns the wiring: resolve and validate the search space (before any compute), scan and
split the data once, then Ray Tune with an Optuna sampler (TPE: seeded, multivariate,
constant liar; or random) whose study lives in the run directory, ASHA over epochs,
and the trial trainable from ``search/trial.py``. After the search it ranks every
trial, writes the report and exports the winner. It holds no training code.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from ray import tune

from search.config import ConfigError, RunConfig
from search.records import (
    COMPLETED,
    FAILED,
    SPACE_FILE,
    STOPPED_EARLY,
    TrialRecord,
    finish_record,
    read_epochs,
    write_record,
    write_state,
)
from search.report import REPORT_MARKDOWN, format_table, write_report
from search.trial import TrialContext, run_search_trial, trial_config
from search.winner import export_run
from search.train_job import create_run_dir, prepare_data
from trainables.metrics import RANKING_METRIC

OPTUNA_JOURNAL = "optuna.journal"


def _load_space_checked(cfg: RunConfig, path: Path):
    """Load the space and build every warm-start recipe's config: all before Ray starts."""
    from search.space_catalog import load_space

    space = load_space(path)
    base = cfg.trial().model_dump(mode="json")
    context = TrialContext(run_dir="", base_config=base)
    for i, point in enumerate(space.warm_start_points()):
        try:
            trial_config(context, space.to_overrides(point))
        except ValueError as err:
            raise ConfigError(f"space '{path}': warm_start[{i}] gives an invalid trial config: {err}") from err
    return space


def _create_searcher(cfg: RunConfig, space, run_dir: Path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    if s.searcher == "tpe":
        # multivariate+group model the joint, conditional space; constant_liar keeps
        # concurrent trials from all sampling the same promising point.
        with warnings.catch_warnings():  # group= is "experimental" but documented for this use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    if s.storage is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(run_dir / OPTUNA_JOURNAL)))
    else:
        storage = optuna.storages.RDBStorage(s.storage)
    points = space.warm_start_points() if s.warm_start else None
    return OptunaSearch(
        space=space.define_by_run,
        metric=RANKING_METRIC,
        mode="max",
        sampler=sampler,
        storage=storage,
        study_name=cfg.name,
        points_to_evaluate=points or None,
    )


def _create_scheduler(cfg: RunConfig):
    if cfg.search.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric=RANKING_METRIC,
        mode="max",
        max_t=cfg.optim.epochs,
        grace_period=cfg.search.asha.grace_period,
        reduction_factor=cfg.search.asha.reduction_factor,
    )


def _trial_resources(cfg: RunConfig) -> dict[str, float]:
    if cfg.scaling.num_workers > 0:
        # The trial only drives a TorchTrainer; a whole CPU here would deadlock small
        # clusters (2 CPUs: 1 for the trial + 1 for its worker, times 2 trials).
        return {"cpu": 0.01}
    resources = {"cpu": cfg.search.cpus_per_trial}
    if cfg.scaling.use_gpu:
        resources["gpu"] = cfg.scaling.gpus_per_worker
    return resources


def run_search(cfg: RunConfig, print_fn=print, callbacks: Sequence[tune.Callback] = ()) -> Path:
    """Search, rank, report and export; return the run directory.

    Args:
        cfg: The validated run config.
        print_fn: Where progress lines go.
        callbacks: Extra Tune callbacks (benchmarks use one to time trials).

    Raises:
        ConfigError: The space is invalid (raised before data or Ray are touched,
            except for ``space: auto``, which needs the training-set size).
    """
    from search.space_catalog import resolve_space_name

    space = None
    if cfg.search.space != "auto":
        space_path, note = resolve_space_name(cfg.search.space)
        space = _load_space_checked(cfg, space_path)
    run_dir = create_run_dir(cfg)
    print_fn(f"run directory: {run_dir}")
    split = prepare_data(cfg, run_dir, print_fn)
    if space is None:
        space_path, note = resolve_space_name("auto", num_train_images=len(split.train))
        space = _load_space_checked(cfg, space_path)
    print_fn(note)
    shutil.copyfile(space_path, run_dir / SPACE_FILE)
    write_state(run_dir, status="running", pid=os.getpid(), hostname=socket.gethostname(), started=time.time())
    try:
        _fit(cfg, space, run_dir, print_fn, callbacks)
    finally:
        write_state(run_dir, status="finished", finished=time.time())
    _, rows = write_report(run_dir)
    print_fn(format_table(rows))
    print_fn(f"report: {run_dir / REPORT_MARKDOWN}")
    if cfg.search.export:
        _export(run_dir, print_fn)
    return run_dir


def _export(run_dir: Path, print_fn) -> None:
    result = export_run(run_dir)
    print_fn(
        f"exported {result.onnx_path}: ONNX macro-F1 {result.onnx_macro_f1:.4f} "
        f"(reported {result.reported_macro_f1:.4f}), argmax agreement {result.argmax_agreement:.4f}, "
        f"max |logit diff| {result.max_abs_logit_diff:.2e}"
    )


def _fit(cfg: RunConfig, space, run_dir: Path, print_fn, callbacks: Sequence[tune.Callback]) -> None:
    import ray

    # Tune warns whenever checkpoints force frequent experiment snapshots, which short
    # CPU epochs always do; the snapshots themselves are cheap (~10 ms) here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set (ray job submit), else starts a local Ray
    context = TrialContext(run_dir=str(run_dir), base_config=cfg.trial().model_dump(mode="json"))
    trainable = tune.with_resources(tune.with_parameters(run_search_trial, context=context), _trial_resources(cfg))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_create_searcher(cfg, space, run_dir),
            scheduler=_create_scheduler(cfg),
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=cfg.search.max_concurrent_trials,
            time_budget_s=cfg.search.time_budget_s,
            trial_dirname_creator=lambda trial: f"tune_{trial.trial_id}",
            # A fresh trial process costs ~4.4 s here (start-up, importing torch and
            # timm); reusing the actor brings a trial's fixed overhead to ~0.2 s.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(run_dir),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[ProgressCallback(run_dir, space, cfg.optim.epochs, print_fn), *callbacks],
            verbose=0,
        ),
    )
    tuner.fit()


class ProgressCallback(tune.Callback):
    """Prints one line per trial event and settles each trial's final status on disk."""

    def __init__(self, run_dir: Path, space, max_epochs: int, print_fn=print) -> None:
        self.run_dir = run_dir
        self.space = space
        self.max_epochs = max_epochs
        self.print = print_fn
        self.best: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(RANKING_METRIC, float("nan"))
        self.best[trial.trial_id] = max(score, self.best.get(trial.trial_id, float("-inf")))
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        self.print(
            f"[{trial.trial_id}] epoch {result.get('epoch')}/{self.max_epochs} "
            f"{RANKING_METRIC} {score:.4f} (best {self.best[trial.trial_id]:.4f})  {params}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = len(read_epochs(self.run_dir, trial.trial_id))
        status = COMPLETED if epochs >= self.max_epochs else STOPPED_EARLY
        record = finish_record(self.run_dir, trial.trial_id, status)
        self.print(f"[{trial.trial_id}] {record.status} after {epochs} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = "trial process died; see the Tune log"
        try:
            record = finish_record(self.run_dir, trial.trial_id, FAILED, reason)
        except FileNotFoundError:  # died before writing its record: no trial may vanish
            record = TrialRecord(
                trial.trial_id, dict(trial.config), self.space.to_overrides(trial.config),
                max_epochs=self.max_epochs, status=FAILED, reason=reason, end_time=time.time(),
            )
            write_record(self.run_dir, record)
        self.print(f"[{trial.trial_id}] failed: {record.reason}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
