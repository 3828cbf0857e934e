"""Entry point of one Ray Train worker: the same loop, with Ray's runtime and reporter.

``TorchTrainer`` pickles the function by reference, so it lives in an importable module
and receives only JSON-able data: the trial config as a dict and the path of the run's
split file (shared storage on a multi-node cluster).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from trainables.config import TrialConfig
from trainables.datasets import SPLIT_FILE, SPLIT_META_FILE, read_split
from trainables.loop import run_trial
from trainables.mirror import Mirror
from trainables.reporting import LAST_DIR, METRICS_FILE, RayTrainReporter, RunDirReporter
from trainables.runtime import ray_train_runtime


def train_loop_per_worker(config: dict) -> None:
    """Run one rank of a trial.

    Args:
        config: ``{"trial": TrialConfig as JSON dict, "split_path": str}`` and
            optionally ``"record_dir"``, where rank 0 keeps metrics and the best and
            last checkpoints (shared storage on a multi-node cluster), and
            ``"resume_epoch"``: continue from ``record_dir/last`` after that epoch.
            Object-store runs give ``"storage_uri"`` and ``"record_rel"`` instead: each
            rank works in its node's copy of the run, and rank 0 uploads each epoch.
    """
    cfg = TrialConfig.model_validate(config["trial"])
    record_dir = config.get("record_dir")
    resume_epoch = config.get("resume_epoch")
    mirror = Mirror.for_location(config["storage_uri"]) if config.get("storage_uri") else None
    split_path = Path(config["split_path"])
    if mirror is not None:
        split_path = mirror.local / SPLIT_FILE
        mirror.pull(*[n for n in (SPLIT_FILE, SPLIT_META_FILE) if not (mirror.local / n).is_file()])
        record_dir = mirror.local / config["record_rel"]
        if resume_epoch is not None:  # every rank loads last/; rank 0 also trims metrics.jsonl
            mirror.pull(f"{config['record_rel']}/{LAST_DIR}", f"{config['record_rel']}/{METRICS_FILE}")
    split = read_split(split_path)
    runtime = ray_train_runtime()
    local = None
    if record_dir and runtime.is_chief:
        local = RunDirReporter(Path(record_dir), keep_last=True, mirror=mirror, mirror_rel=config.get("record_rel", ""))
        local.resume_after(resume_epoch or 0)  # a fresh start drops an earlier attempt's lines
    resume_from = Path(record_dir) / LAST_DIR if record_dir and resume_epoch is not None else None
    run_trial(cfg, split, RayTrainReporter(local), runtime, resume_from=resume_from)


def evaluate_loop_per_worker(config: dict) -> None:
    """Evaluate a saved checkpoint on the validation split, sharded over the workers.

    Args:
        config: ``{"checkpoint": dir, "split_path": str, "batch_size": int}``; every rank
            must read both paths (shared storage). Rank 0 reports the metrics, gathered
            over all ranks, and the Ray node of every rank.
    """
    import ray
    import ray.train

    from trainables.checkpoint import load_model
    from trainables.loaders import create_val_loader
    from trainables.loop import evaluate
    from trainables.transforms import eval_transform_from_spec

    runtime = ray_train_runtime()
    model, meta = load_model(Path(config["checkpoint"]))
    model.to(runtime.device)  # evaluation needs no DDP wrapper: nothing is trained
    split = read_split(Path(config["split_path"]))
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
