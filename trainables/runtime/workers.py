"""Entry points of Ray Train workers: the same loop with Ray's runtime and reporter.
``TorchTrainer`` pickles them by reference, so they take only JSON-able data: the trial
config as a dict, and locations every node opens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from trainables.model.checkpoint import last_checkpoint_epoch
from trainables.config import TrialConfig
from trainables.data.datasets import DataSplit
from trainables.data.split_files import read_split
from trainables.data.locations import ray_checkpoint
from trainables.training.loop import run_trial
from trainables.training.reporting import RayReporter
from trainables.runtime.ranks import Runtime, ray_train_runtime

RESUMED_FROM_EPOCH = "resumed_from_epoch"  # in every result of a trial that continued


def train_loop_per_worker(config: dict) -> None:
    """Run one rank of a trial; rank 0 hands Ray Train a checkpoint every epoch.

    A trial continues from a checkpoint when Ray Train restores its run (the trial was
    retried: ``ray.train.get_checkpoint()``) or, failing that, from ``resume_from``
    (a checkpoint an earlier driver's run kept). Every rank loads the same one.

    Args:
        config: ``{"trial": TrialConfig as a JSON dict, "split": the run's split
            location}`` and optionally ``"resume_from"``, a checkpoint location.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray_checkpoint(config["resume_from"])
    run_trial_from(
        TrialConfig.model_validate(config["trial"]), read_split(config["split"]), ray_train_runtime(), checkpoint
    )


def run_trial_from(cfg: TrialConfig, split: DataSplit, runtime: Runtime, checkpoint, report_fn=None,
                   checkpoint_type=None) -> None:
    """Run a trial that reports to Ray, continuing from ``checkpoint`` (a Ray checkpoint) if given.

    ``report_fn`` and ``checkpoint_type`` default to Ray Train's; see ``RayReporter``.
    """
    if checkpoint is None:
        run_trial(cfg, split, RayReporter(report_fn, checkpoint_type), runtime)
        return
    with checkpoint.as_directory() as directory:
        extra = {RESUMED_FROM_EPOCH: last_checkpoint_epoch(Path(directory))}
        reporter = RayReporter(report_fn, checkpoint_type, extra)
        run_trial(cfg, split, reporter, runtime, resume_from=Path(directory))


def evaluate_loop_per_worker(config: dict) -> None:
    """Evaluate a saved checkpoint on the validation split, sharded over the workers.

    Args:
        config: ``{"checkpoint": location, "split": location, "batch_size": int}``;
            locations are local paths every node can read, or object-store URIs.
            Rank 0 reports the metrics, gathered over all ranks, and the Ray node of
            every rank.
    """
    import ray
    import ray.train

    from trainables.model.checkpoint import load_model
    from trainables.data.loaders import create_val_loader
    from trainables.training.loop import evaluate
    from trainables.data.transforms import eval_transform_from_spec

    runtime = ray_train_runtime()
    with ray_checkpoint(config["checkpoint"]).as_directory() as directory:
        model, meta = load_model(Path(directory))
    model.to(runtime.device)  # evaluation needs no DDP wrapper: nothing is trained
    split = read_split(config["split"])
    loader, _ = create_val_loader(
        split, eval_transform_from_spec(meta["preprocessing"]), batch_size=config["batch_size"],
        num_workers=0, runtime=runtime, max_pixels=meta["config"]["data"]["max_image_pixels"],
    )
    metrics = evaluate(model, loader, runtime, list(split.class_names))
    nodes = runtime.all_gather(ray.get_runtime_context().get_node_id())
    result = {**metrics.scalars(), "nodes": nodes, "world_size": runtime.world_size}
    # Ray Train keeps only metrics that come with a checkpoint: rank 0 attaches one
    # holding the full per-class record.
    with tempfile.TemporaryDirectory(prefix="tunecv-eval-") as tmp:
        checkpoint = None
        if runtime.is_chief:
            (Path(tmp) / "evaluation.json").write_text(json.dumps({
                **result, "per_class": {k: vars(v) for k, v in metrics.per_class.items()},
                "confusion_matrix": metrics.confusion_matrix,
            }, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(result, checkpoint=checkpoint)
