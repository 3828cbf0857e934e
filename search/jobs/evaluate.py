"""``tunecv evaluate``: a saved checkpoint's metrics on a split, on one worker or many.

Owns running ``trainables.workers.evaluate_loop_per_worker`` in a ``TorchTrainer``:
each worker evaluates its contiguous shard of the validation set and the metrics are
computed over all of it, so any number of workers, on any nodes, gives the numbers one
process gives. Used to check a multi-node cluster, and to re-score a checkpoint.
Checkpoint and split are read through ``pyarrow.fs`` (paths every node reads, or URIs);
nothing is written into the run they come from.
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
    import ray.train
    from ray.train.torch import TorchTrainer

    from search.ray_session import connect_ray
    from search.storage import RunStore
    from trainables.workers import evaluate_loop_per_worker

    connect_ray()
    temporary = None if storage else tempfile.mkdtemp(prefix="tunecv-evaluate-")
    store = RunStore.at(storage or temporary)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        evaluate_loop_per_worker,
        train_loop_config={
            "checkpoint": str(RunStore.at(checkpoint)), "split": str(RunStore.at(split)), "batch_size": batch_size,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"evaluate-{num_workers}w", storage_path=store.fs_path(), storage_filesystem=store.filesystem,
        ),
    )
    try:
        return dict(trainer.fit().metrics)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
