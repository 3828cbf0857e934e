"""How a trial trains, behind one interface: ``InProcessRunner`` (``scaling.num_workers:
0``) runs the loop in the Tune actor and reports with ``ray.tune.report``, about 1.5 s
of overhead instead of 20; ``TorchTrainerRunner`` drives a ``TorchTrainer`` whose
workers report with ``ray.train.report`` and whose checkpoints ``TuneReportCallback``
passes on by path, so each is uploaded once. A retry continues from Ray's own
checkpoint; a trial a later driver continues starts from ``resume_from``.
"""

from __future__ import annotations

import abc
from typing import Any

from search.layout import TRAIN_SUBDIR
from search.storage import RunStore
from trainables.config import ScalingConfig, TrialConfig
from trainables.training.metrics import RANKING_METRIC


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

        from trainables.data.split_files import read_split
        from trainables.data.locations import ray_checkpoint
        from trainables.runtime.ranks import local_runtime
        from trainables.runtime.workers import run_trial_from

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
    """A ``TorchTrainer`` training ``cfg`` on the workers of ``cfg.scaling``.

    Ray Train's run is ``storage/train``; it keeps the best checkpoint by macro-F1 and
    the latest. Running the same trainer again (a retried trial) resumes that run;
    ``resume_from`` (a checkpoint location) is where a run with no checkpoint starts.
    """
    import ray.train

    from trainables.runtime.workers import train_loop_per_worker

    loop_config = {"trial": cfg.model_dump(mode="json"), "split": split, "resume_from": resume_from}
    checkpoints = keep_best_and_latest(ray.train.CheckpointConfig)
    return torch_trainer(train_loop_per_worker, loop_config, cfg.scaling, storage, TRAIN_SUBDIR,
                         checkpoint_config=checkpoints, **run_config)


def torch_trainer(loop, loop_config: dict, scaling: ScalingConfig, storage: RunStore, name: str, **run_config: Any):
    """A ``TorchTrainer`` of ``loop`` with ``scaling``'s workers and resources, its run at ``storage/name``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage.fs_path(),
                                       storage_filesystem=storage.filesystem, **run_config),
    )


def keep_best_and_latest(checkpoint_config_type):
    """Ray's ``CheckpointConfig`` (Tune's or Train's) keeping the best epoch by macro-F1;
    Ray always keeps the latest checkpoint too, so a retry continues from it."""
    return checkpoint_config_type(
        num_to_keep=1, checkpoint_score_attribute=RANKING_METRIC, checkpoint_score_order="max"
    )
