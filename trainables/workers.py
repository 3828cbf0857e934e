"""Entry point of one Ray Train worker: the same loop, with Ray's runtime and reporter.

``TorchTrainer`` pickles the function by reference, so it lives in an importable module
and receives only JSON-able data: the trial config as a dict and the path of the run's
split file (shared storage on a multi-node cluster).
"""

from __future__ import annotations

from pathlib import Path

from trainables.config import TrialConfig
from trainables.datasets import read_split
from trainables.loop import run_trial
from trainables.reporting import LAST_DIR, RayTrainReporter, RunDirReporter
from trainables.runtime import ray_train_runtime


def train_loop_per_worker(config: dict) -> None:
    """Run one rank of a trial.

    Args:
        config: ``{"trial": TrialConfig as JSON dict, "split_path": str}`` and
            optionally ``"record_dir"``, where rank 0 keeps metrics and the best and
            last checkpoints (shared storage on a multi-node cluster), and
            ``"resume_epoch"``: continue from ``record_dir/last`` after that epoch.
    """
    cfg = TrialConfig.model_validate(config["trial"])
    split = read_split(Path(config["split_path"]))
    record_dir = config.get("record_dir")
    resume_epoch = config.get("resume_epoch")
    runtime = ray_train_runtime()
    local = None
    if record_dir and runtime.is_chief:
        local = RunDirReporter(Path(record_dir), keep_last=True)
        if resume_epoch is not None:
            local.resume_after(resume_epoch)
    resume_from = Path(record_dir) / LAST_DIR if record_dir and resume_epoch is not None else None
    run_trial(cfg, split, RayTrainReporter(local), runtime, resume_from=resume_from)
