"""How a trial trains: in its Tune actor, or through a Ray Train ``TorchTrainer``.

``TrialRunner`` is the one interface; ``create_runner`` picks the implementation from
``scaling.num_workers``:

- ``InProcessRunner`` (0 workers) runs the loop in the Tune actor and reports each
  epoch with ``ray.tune.report``: no worker group, about 1.5 s of overhead instead of 20.
  Tune uploads each epoch's checkpoint into the trial's directory and, when it retries
  a crashed trial, hands the latest back through ``ray.tune.get_checkpoint()``.
- ``TorchTrainerRunner`` (N >= 1 workers, DDP) drives a ``TorchTrainer`` whose workers
  report with ``ray.train.report``. Ray Train uploads each checkpoint once, into the
  same trial directory; ``TuneReportCallback`` forwards the metrics and the checkpoint's
  path to Tune without copying it again. A retried trial restarts the same Ray Train
  run, which hands its workers the latest checkpoint.

Either way a trial continued by a later driver starts from ``resume_from``: a
checkpoint that an earlier driver's run kept. Nothing here writes a file itself.
"""

from __future__ import annotations

import abc
from typing import Any

from search.layout import TRAIN_SUBDIR
from search.storage import RunStore
from trainables.config import TrialConfig
from trainables.metrics import RANKING_METRIC


class TrialRunner(abc.ABC):
    """Trains one trial config to its last epoch, reporting every epoch to Tune."""

    def __init__(self, cfg: TrialConfig, split: str) -> None:
        self.cfg = cfg
        self.split = split  # the run's split file, as a location every node opens

    @abc.abstractmethod
    def run(self, resume_from: str | None) -> None:
        """Train; continue from the checkpoint at ``resume_from`` when Ray has none newer."""


class InProcessRunner(TrialRunner):
    def run(self, resume_from: str | None) -> None:
        from ray import tune

        from trainables.datasets import read_split
        from trainables.locations import ray_checkpoint
        from trainables.runtime import local_runtime
        from trainables.workers import run_trial_from

        checkpoint = tune.get_checkpoint() or (ray_checkpoint(resume_from) if resume_from else None)
        run_trial_from(
            self.cfg, read_split(self.split), local_runtime(self.cfg.scaling.use_gpu), checkpoint,
            report_fn=tune.report, checkpoint_type=tune.Checkpoint,
        )


class TorchTrainerRunner(TrialRunner):
    def __init__(self, cfg: TrialConfig, split: str, trial_store: RunStore) -> None:
        super().__init__(cfg, split)
        self.trial_store = trial_store  # the Tune trial's directory; Ray Train's run goes inside

    def run(self, resume_from: str | None) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer = create_torch_trainer(
            self.cfg, self.split, self.trial_store, resume_from=resume_from, callbacks=[TuneReportCallback()]
        )
        trainer.fit()


def create_runner(cfg: TrialConfig, split: str, trial_store: RunStore) -> TrialRunner:
    if cfg.scaling.num_workers == 0:
        return InProcessRunner(cfg, split)
    return TorchTrainerRunner(cfg, split, trial_store)


def create_torch_trainer(
    cfg: TrialConfig, split: str, storage: RunStore, resume_from: str | None = None, **run_config: Any
):
    """A ``TorchTrainer`` running ``cfg`` with the workers and resources of ``cfg.scaling``.

    Ray Train's run is ``storage/train``; it keeps the best checkpoint by macro-F1 and
    the latest. Running the same trainer again (a retried trial) resumes that run.

    Args:
        cfg: The trial config.
        split: The run's split file (a location every node reads).
        storage: Where Ray Train's run goes.
        resume_from: A checkpoint location to start from when the run has none.
        **run_config: Extra ``ray.train.RunConfig`` fields (callbacks).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.workers import train_loop_per_worker

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    loop_config = {"trial": cfg.model_dump(mode="json"), "split": split, "resume_from": resume_from}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=TRAIN_SUBDIR, storage_path=storage.fs_path(), storage_filesystem=storage.filesystem,
            checkpoint_config=keep_best_and_latest(ray.train.CheckpointConfig), **run_config,
        ),
    )


def keep_best_and_latest(checkpoint_config_type):
    """Ray's ``CheckpointConfig`` (Tune's or Train's) keeping the best epoch by macro-F1;
    Ray always keeps the latest checkpoint too, so a retry continues from it."""
    return checkpoint_config_type(
        num_to_keep=1, checkpoint_score_attribute=RANKING_METRIC, checkpoint_score_order="max"
    )
