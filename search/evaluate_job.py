"""``tunecv evaluate``: a saved checkpoint's metrics on a split, on one worker or many.

Owns running ``trainables.workers.evaluate_loop_per_worker`` in a ``TorchTrainer``:
each worker evaluates its contiguous shard of the validation set and the metrics are
computed over all of it, so any number of workers, on any nodes, gives the numbers one
process gives. Used to check a multi-node cluster, and to re-score a checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def evaluate_checkpoint(
    checkpoint: Path,
    split_path: Path,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation images of ``split_path``.

    Both paths must be readable on every node. Ray Train's own state goes next to the
    checkpoint, under ``evaluations/``.

    Returns:
        The metrics (macro-F1, accuracy, ...), ``world_size`` and the Ray ``nodes`` of
        the ranks.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.workers import evaluate_loop_per_worker

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set, else starts a local Ray
    checkpoint = Path(checkpoint).resolve()
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        evaluate_loop_per_worker,
        train_loop_config={
            "checkpoint": str(checkpoint), "split_path": str(Path(split_path).resolve()),
            "batch_size": batch_size,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"evaluate-{num_workers}w-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(checkpoint.parent / "evaluations"),
        ),
    )
    return dict(trainer.fit().metrics)
