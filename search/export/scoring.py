"""A model run over a split with the preprocessing its checkpoint or bundle records, and
scored: the loader both runtimes read, metrics from logits exactly as the training loop
computes them, and the held-out test report (macro-F1 with its bootstrap interval, per
class, confusion matrix) of an exported model or of a finalist's checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from search.export.bundle import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, ExportError
from trainables.data.datasets import DataSplit
from trainables.data.images import DEFAULT_MAX_PIXELS
from trainables.data.loaders import create_val_loader
from trainables.data.transforms import eval_transform_from_spec
from trainables.model.checkpoint import load_model
from trainables.runtime.ranks import local_runtime
from trainables.training.metrics import TOP_K, EvalMetrics, compute_metrics, top_k_classes


def eval_loader(split: DataSplit, meta: dict[str, Any], batch_size: int, which: str = "val"):
    """The split's validation (or ``which``) images, preprocessed as ``meta`` (a checkpoint's
    or a bundle's ``preprocessing`` and ``config``) says: what the export check and the
    retrain gate read."""
    spec = meta["preprocessing"]
    try:
        transform = eval_transform_from_spec(spec)
    except KeyError as err:
        raise ExportError(
            f"the checkpoint's preprocessing has no {err} key; expected the fields of "
            f"trainables.data.transforms.preprocessing_spec, got {sorted(spec)}."
        ) from err
    except ValueError as err:  # another alpha rule or resize mode than tunecv's
        raise ExportError(f"the checkpoint's preprocessing cannot be reproduced: {err}") from err
    max_pixels = meta["config"].get("data", {}).get("max_image_pixels", DEFAULT_MAX_PIXELS)
    loader, _ = create_val_loader(
        split, transform, batch_size=batch_size, num_workers=0, runtime=local_runtime(False),
        max_pixels=max_pixels, which=which,
    )
    return loader


def test_report(session, split: DataSplit, meta: dict[str, Any], batch_size: int) -> dict[str, Any] | None:
    """The exported ONNX model (``session``) scored on the split's held-out test images,
    which nothing in the search saw: macro-F1 with its bootstrap interval, per-class
    metrics and the confusion matrix. None when the split has no test images."""
    if not split.test:
        return None
    run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]  # noqa: E731
    return _test_scores(run, split, meta, batch_size, f"ONNX Runtime, {ONNX_FILE} (fp32)")


def checkpoint_test_report(checkpoint_dir: Path, split: DataSplit, batch_size: int = 64) -> dict[str, Any] | None:
    """``test_report`` for a checkpoint in PyTorch: a finalist that is not exported."""
    if not split.test:
        return None
    model, meta = load_model(checkpoint_dir)
    return model_test_report(model, meta, split, batch_size, "PyTorch, the checkpoint")


def model_test_report(model: torch.nn.Module, meta: dict[str, Any], split: DataSplit, batch_size: int = 64,
                      scored_by: str = "PyTorch") -> dict[str, Any] | None:
    """``test_report`` for an eval-mode model in memory, preprocessed as ``meta`` says."""
    if not split.test:
        return None

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).numpy()

    return _test_scores(run, split, meta, batch_size, scored_by)


def _test_scores(run, split: DataSplit, meta: dict[str, Any], batch_size: int, scored_by: str) -> dict[str, Any]:
    from search.results.intervals import macro_f1_interval

    labels, logits = [], []
    for x, y in eval_loader(split, meta, batch_size, which="test"):
        logits.append(run(x))
        labels.append(y.numpy())
    names = meta["class_names"]
    metrics = metrics_from_logits(np.concatenate(logits), np.concatenate(labels), names)
    interval = macro_f1_interval(np.concatenate(labels), metrics.predictions, len(names))
    return {
        "num_images": len(split.test), "scored_by": scored_by,
        **metrics.scalars(), "macro_f1_interval": interval.to_json(),
        "per_class": {name: vars(m) for name, m in metrics.per_class.items()},
        "confusion_matrix": metrics.confusion_matrix,
    }


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, class_names) -> EvalMetrics:
    """The top-k and cross-entropy that ``trainables.training.loop.evaluate`` gives compute_metrics."""
    scores = torch.from_numpy(logits).float()
    topk = top_k_classes(logits, min(TOP_K, len(class_names)))  # ties to the lower index, as in training
    losses = F.cross_entropy(scores, torch.from_numpy(labels), reduction="none").numpy()
    return compute_metrics(labels, topk, losses, class_names)
