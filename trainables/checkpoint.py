"""Checkpoints as safetensors weights plus a JSON sidecar; loading never unpickles.

A checkpoint directory holds ``model.safetensors`` (tensors only, safe to open from
anywhere) and ``meta.json`` (class names, preprocessing spec, the trial config, epoch
and metrics). This module owns that format and rebuilding a model from it. It does not
decide when to checkpoint: the loop does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
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
    from safetensors.torch import load_model as load_weights

    directory = Path(directory)
    meta = read_meta(directory)
    model = timm.create_model(
        meta["backbone"], pretrained=False, num_classes=len(meta["class_names"])
    )
    load_weights(model, str(directory / WEIGHTS_FILE), strict=True, device="cpu")
    model.eval()
    return model, meta
