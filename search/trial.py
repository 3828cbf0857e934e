"""The Tune trainable: one search trial = searcher parameters -> config -> the loop.

Owns the glue between Tune and ``trainables/``: turning the searcher's flat parameters
into a ``TrialConfig`` (the run's fixed settings with the space's overrides on top),
recording the trial on disk, and running the loop either in this Tune actor
(``scaling.num_workers: 0``: no worker group, ~1.5 s overhead instead of ~20 s) or
through a ``TorchTrainer`` whose workers report back via ``TuneReportCallback``. A
trial that raises is recorded as failed with its reason and the error is re-raised,
so Tune and the searcher see the failure too. A trial that finds its own ``last/``
checkpoint (Tune retrying it after a crash, or a resumed search continuing it)
continues from the epoch after it instead of starting over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from search.records import (
    BEST_DIR,
    COMPLETED,
    FAILED,
    LAST_DIR,
    METRICS_FILE,
    RECORD_FILE,
    RUNNING,
    SPACE_FILE,
    SPLIT_FILE,
    SPLIT_META_FILE,
    TRIALS_DIR,
    TrialRecord,
    read_epochs,
    read_record,
    trial_dir,
    write_record,
)
from search.searcher import TRIAL_ID_KEY, searched_params
from trainables.checkpoint import last_checkpoint_epoch
from trainables.config import TrialConfig
from trainables.mirror import Mirror
from trainables.reporting import EpochResult, RunDirReporter


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a run shares; passed once through ``tune.with_parameters``."""

    run_dir: str
    base_config: dict[str, Any]  # TrialConfig as JSON: the run's fixed settings
    storage_uri: str | None = None  # object-store runs: trials work in a node-local copy


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied recursively (neither is modified)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def trial_config(context: TrialContext, overrides: dict) -> TrialConfig:
    """The fully resolved config of one trial."""
    return TrialConfig.model_validate(deep_merge(context.base_config, overrides))


class TuneReporter(RunDirReporter):
    """Keeps the trial's metrics and best checkpoint on disk, and reports to Tune."""

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        from ray import tune

        super().report(result, checkpoint_dir)
        # No Tune checkpoint: the trial's last/ (kept above) is what a retry resumes
        # from, one copy per epoch instead of two.
        tune.report(_scalars(result.flat()))


def _scalars(epoch: dict[str, Any]) -> dict[str, Any]:
    """An epoch's result without per-class tables: what Tune and ASHA take."""
    return {k: v for k, v in epoch.items() if not isinstance(v, (dict, list))}


def run_search_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: run one trial of the search.

    Args:
        params: The searcher's flat parameters plus the run-level trial id.
        context: The run's shared settings.
    """
    from search.space_catalog import load_space

    # Ray logs every persisted checkpoint at INFO: one line per epoch per trial would
    # drown the search's own progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    trial_id = params[TRIAL_ID_KEY]
    mirror = Mirror.for_location(context.storage_uri) if context.storage_uri else None
    run_dir = Path(context.run_dir)
    if mirror is not None:
        run_dir = mirror.local
        _fetch_for_trial(mirror, trial_id)
    if not (run_dir / SPLIT_FILE).is_file():
        # A node that joined after the driver's storage check, without the shared mount.
        raise RuntimeError(
            f"run directory '{run_dir}' is not visible on {socket.gethostname()}: output_dir must be "
            "a filesystem mounted at the same path on every node (see cluster/README.md)."
        )
    searched = searched_params(params)
    space = load_space(run_dir / SPACE_FILE, check_depths=False)
    overrides = space.to_overrides(searched)
    max_epochs = context.base_config["optim"]["epochs"]
    kept = last_checkpoint_epoch(trial_dir(run_dir, trial_id) / LAST_DIR)  # an earlier attempt's
    resume_epoch = kept if kept is not None and kept < max_epochs else None
    record = _start_record(run_dir, TrialRecord(trial_id, searched, overrides, max_epochs=max_epochs), resume_epoch)
    save = _record_saver(run_dir, trial_id, mirror)
    save(record)
    if kept is not None and kept >= max_epochs and _report_kept_last_epoch(run_dir, trial_id):
        save(replace(record, status=COMPLETED, end_time=time.time()))
        return
    stop_requested = _tune_stop_event()
    try:
        cfg = trial_config(context, overrides)
        if cfg.scaling.num_workers == 0:
            _run_in_process(cfg, run_dir, trial_id, resume_epoch, mirror)
        else:
            _run_with_torch_trainer(cfg, run_dir, trial_id, resume_epoch, mirror)
    except Exception as err:
        if stop_requested.is_set():
            # Tune stopped the trial (ASHA, its final epoch, or the search ending) and
            # tore it down while Ray Train was still shutting its workers down: the
            # error is that teardown, not the trial failing. The driver has settled
            # the record as completed or stopped early; do not overwrite it.
            return
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        save(replace(read_record(run_dir, trial_id), status=FAILED, reason=reason, end_time=time.time()))
        raise
    save(replace(record, status=COMPLETED, end_time=time.time()))


def _tune_stop_event() -> threading.Event:
    """The event Tune sets when it stops this trial.

    Tune stops a trial as soon as the scheduler says so, its final epoch included,
    without waiting for the trainable to return. Ray has no public API for "was I
    stopped"; the session's stop event is the first thing Tune's stop sets, and it is
    taken here because the session itself is gone by the time the thread notices.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    return getattr(session, "stop_event", None) or threading.Event()


def _fetch_for_trial(mirror: Mirror, trial_id: str) -> None:
    """Object-store runs: the split and space once per node, and this trial's own state
    afresh (a retry may land on another node than the attempt before)."""
    import shutil

    missing = [name for name in (SPLIT_FILE, SPLIT_META_FILE, SPACE_FILE) if not (mirror.local / name).is_file()]
    mirror.pull(*missing)
    rel = f"{TRIALS_DIR}/{trial_id}"
    shutil.rmtree(mirror.local / rel, ignore_errors=True)
    mirror.pull(f"{rel}/{RECORD_FILE}", f"{rel}/{METRICS_FILE}", f"{rel}/{LAST_DIR}")


def _record_saver(run_dir: Path, trial_id: str, mirror: Mirror | None):
    def save(record: TrialRecord) -> None:
        write_record(run_dir, record)
        if mirror is not None:
            mirror.push(f"{TRIALS_DIR}/{trial_id}/{RECORD_FILE}")

    return save


def _report_kept_last_epoch(run_dir: Path, trial_id: str) -> bool:
    """A retry of a trial whose last epoch was already kept (it died while finishing):
    report that epoch to Tune again instead of training it all over."""
    from ray import tune

    epochs = read_epochs(run_dir, trial_id)
    if epochs:
        tune.report(_scalars(epochs[-1]))
    return bool(epochs)


def _start_record(run_dir: Path, fresh: TrialRecord, resume_epoch: int | None) -> TrialRecord:
    """The trial's record as running; a later attempt keeps its history."""
    try:
        old = read_record(run_dir, fresh.trial_id)
    except FileNotFoundError:
        old = None
    where = {"hostname": socket.gethostname(), "pid": os.getpid()}
    if old is None:
        record = replace(fresh, **where)
    else:
        why = old.reason or f"attempt {old.attempts} was interrupted ({old.status})"
        record = replace(
            old, status=RUNNING, reason=None, end_time=None, attempts=old.attempts + 1,
            resumed_from_epoch=resume_epoch, failures=[*old.failures, why], **where,
        )
    return record


def _run_in_process(
    cfg: TrialConfig, run_dir: Path, trial_id: str, resume_epoch: int | None, mirror: Mirror | None
) -> None:
    from trainables.datasets import read_split
    from trainables.loop import run_trial
    from trainables.runtime import local_runtime

    split = read_split(run_dir / SPLIT_FILE)
    directory = trial_dir(run_dir, trial_id)
    reporter = TuneReporter(directory, keep_last=True, mirror=mirror, mirror_rel=f"{TRIALS_DIR}/{trial_id}")
    # A fresh start too drops what an earlier attempt reported before its first checkpoint.
    reporter.resume_after(resume_epoch or 0)
    resume_from = directory / LAST_DIR if resume_epoch is not None else None
    run_trial(cfg, split, reporter, local_runtime(cfg.scaling.use_gpu), resume_from=resume_from)


def create_torch_trainer(cfg: TrialConfig, split_path: Path, storage_path: Path, **run_config):
    """A ``TorchTrainer`` running ``cfg`` with the workers and resources of ``cfg.scaling``.

    Args:
        cfg: The trial config.
        split_path: The run's split file (shared storage on a multi-node cluster).
        storage_path: Where Ray Train keeps its own state and checkpoints.
        **run_config: Extra ``ray.train.RunConfig`` fields (callbacks, checkpoint_config);
            ``record_dir``, ``resume_epoch``, ``storage_uri`` and ``record_rel`` instead
            go to the workers (see ``trainables.workers.train_loop_per_worker``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.workers import train_loop_per_worker

    s = cfg.scaling
    loop_config = {"trial": cfg.model_dump(mode="json"), "split_path": str(split_path)}
    for key in ("record_dir", "resume_epoch", "storage_uri", "record_rel"):
        value = run_config.pop(key, None)
        if value is not None:
            loop_config[key] = str(value) if isinstance(value, Path) else value
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(name="ray_train", storage_path=str(storage_path), **run_config),
    )


def _run_with_torch_trainer(
    cfg: TrialConfig, run_dir: Path, trial_id: str, resume_epoch: int | None, mirror: Mirror | None
) -> None:
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    directory = trial_dir(run_dir, trial_id)
    if mirror is not None:
        # Workers may sit on other nodes: they fetch and upload through the store, and
        # Ray Train keeps its own state there too.
        storage = f"{mirror.uri}/{TRIALS_DIR}/{trial_id}"
        placement = {"storage_uri": mirror.uri, "record_rel": f"{TRIALS_DIR}/{trial_id}"}
    else:
        storage, placement = directory, {"record_dir": directory}
    create_torch_trainer(
        cfg, run_dir / SPLIT_FILE, storage, resume_epoch=resume_epoch, callbacks=[TuneReportCallback()],
        # Ray Train's own copy of each epoch's checkpoint: the trial keeps best/ and
        # last/ itself, so one is enough.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1), **placement,
    ).fit()


def best_checkpoint_dir(run_dir: Path, trial_id: str) -> Path:
    """Where a trial keeps its best checkpoint."""
    return trial_dir(run_dir, trial_id) / BEST_DIR
