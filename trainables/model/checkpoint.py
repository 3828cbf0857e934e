"""Checkpoints as safetensors weights plus JSON sidecars; loading never unpickles.

A checkpoint directory holds ``model.safetensors`` (tensors only, safe to open from
anywhere), ``meta.json`` (class names, preprocessing spec, the trial config, epoch and
metric scalars) and ``metrics.json`` (that epoch's per-class metrics and confusion
matrix). A resumable one adds ``train_state/``: the optimizer's tensors as safetensors,
and its hyperparameters, the LR schedule's position, the GradScaler and the epoch as
JSON, so a trial that crashed continues where it stopped. This module owns that format
and rebuilding a model from it; the loop decides when to checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
METRICS_FILE = "metrics.json"
TRAIN_STATE_DIR = "train_state"
_OPTIMIZER_TENSORS = "optimizer.safetensors"
_STATE_JSON = "state.json"
# What a checkpoint needs to resume training: a reader checks these before relying on it.
RESUMABLE_FILES = (
    WEIGHTS_FILE, META_FILE, f"{TRAIN_STATE_DIR}/{_STATE_JSON}", f"{TRAIN_STATE_DIR}/{_OPTIMIZER_TENSORS}",
)
FORMAT_VERSION = 1


def save_checkpoint(directory: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` into ``directory`` (created if needed).

    Args:
        directory: Target directory.
        model: The unwrapped model (no DDP ``module.`` prefixes).
        meta: JSON-serialisable metadata; must include ``class_names``, ``backbone``
            and ``preprocessing``.

    Returns:
        ``directory``.
    """
    from safetensors.torch import save_model

    for key in ("class_names", "backbone", "preprocessing"):
        if key not in meta:
            raise ValueError(f"checkpoint meta needs '{key}', got keys {sorted(meta)}.")
    directory.mkdir(parents=True, exist_ok=True)
    # save_model (not save_file) copes with tied weights, which some timm heads have.
    save_model(model, str(directory / WEIGHTS_FILE))
    payload = {"format_version": FORMAT_VERSION, **meta}
    (directory / META_FILE).write_text(json.dumps(payload, indent=2, default=str))
    return directory


def write_epoch_metrics(directory: Path, metrics: dict[str, Any]) -> None:
    """Write the epoch's full evaluation (scalars, per-class, confusion matrix) as ``metrics.json``."""
    (Path(directory) / METRICS_FILE).write_text(json.dumps(metrics))


def read_meta(directory: Path) -> dict[str, Any]:
    """The checkpoint's metadata."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {META_FILE} in '{directory}': not a tunecv checkpoint.")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint '{directory}' has format_version {meta.get('format_version')}, "
            f"this tunecv reads {FORMAT_VERSION}."
        )
    return meta


def load_model(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the timm model of a checkpoint and load its weights (CPU, eval mode).

    Returns:
        (model, meta).
    """
    import timm

    directory = Path(directory)
    meta = read_meta(directory)
    model = timm.create_model(
        meta["backbone"], pretrained=False, num_classes=len(meta["class_names"])
    )
    load_weights_into(model, directory)
    model.eval()
    return model, meta


def save_training_state(directory: Path, optimizer, scheduler, scaler, epoch: int) -> Path:
    """Write what resuming after ``epoch`` needs besides the weights into ``directory/train_state``.

    Optimizer tensors (AdamW moments, step counts) go to safetensors; everything else in
    the state dicts is plain numbers and strings, so JSON holds it and nothing is pickled.
    """
    from safetensors.torch import save_file

    target = Path(directory) / TRAIN_STATE_DIR
    target.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if hasattr(value, "detach"):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(target / _OPTIMIZER_TENSORS))
    state = {
        "epoch": epoch,
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    (target / _STATE_JSON).write_text(json.dumps(state, indent=1))
    return target


def last_checkpoint_epoch(directory: Path) -> int | None:
    """The epoch a resumable checkpoint was saved after, or None when there is none."""
    path = Path(directory) / TRAIN_STATE_DIR / _STATE_JSON
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else None


def load_training_state(directory: Path, optimizer, scheduler, scaler) -> int:
    """Restore optimizer, LR schedule and GradScaler from ``directory``; return the epoch."""
    from safetensors.torch import load_file

    source = Path(directory) / TRAIN_STATE_DIR
    state = json.loads((source / _STATE_JSON).read_text())
    entries: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(str(source / _OPTIMIZER_TENSORS)).items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = tensor
    for name, value in state["optimizer_scalars"].items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    # load_state_dict moves each tensor to its parameter's device and dtype.
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer_param_groups"]})
    for param, slots in optimizer.state.items():
        for key, value in slots.items():
            if hasattr(value, "shape") and value.shape == param.shape:
                # Same memory format as the parameter (channels_last on GPU), or fused
                # and foreach AdamW fall back to their slow path.
                slots[key] = torch.empty_like(param).copy_(value)
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])


def load_weights_into(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's weights into an already built (unwrapped) model."""
    from safetensors.torch import load_model as load_weights

    load_weights(model, str(Path(directory) / WEIGHTS_FILE), strict=True, device="cpu")
