"""``tunecv evaluate``: a checkpoint's metrics on a split, on one Ray Train worker or
many, each evaluating a contiguous shard, so any number of workers on any nodes gives
the numbers one process gives. Inputs are read through ``pyarrow.fs``; nothing is
written into the run they come from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str | Path,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    batch_size: int = 64,
    storage: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation images of ``split``.

    Args:
        checkpoint: A checkpoint directory: a local path every node reads, or a URI.
        split: The run's ``split.parquet``, the same way.
        storage: Where Ray Train keeps the evaluation run (a shared path or a URI on a
            multi-node cluster); default: a temporary directory, deleted afterwards.

    Returns:
        The metrics (macro-F1, accuracy, ...), ``world_size`` and the Ray ``nodes`` of
        the ranks.
    """
    from search.ray_session import connect_ray
    from search.run.runners import torch_trainer
    from search.storage import RunStore
    from trainables.config import ScalingConfig
    from trainables.workers import evaluate_loop_per_worker

    connect_ray()
    temporary = None if storage else tempfile.mkdtemp(prefix="tunecv-evaluate-")
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
    loop_config = {"checkpoint": str(RunStore.at(checkpoint)), "split": str(RunStore.at(split)),
                   "batch_size": batch_size}
    trainer = torch_trainer(evaluate_loop_per_worker, loop_config, scaling, RunStore.at(storage or temporary),
                            f"evaluate-{num_workers}w")
    try:
        return dict(trainer.fit().metrics)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
