"""Validation metrics for one epoch: macro-F1 first, never accuracy alone.

Owns the metric names (``RANKING_METRIC`` is the one constant every ranking uses) and
the computation from labels, predictions, top-k predictions and per-sample losses.
It does not run the model: the loop gathers predictions over the whole validation
set (all ranks) and hands them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RANKING_METRIC = "macro_f1"
PREDICTIONS = "predictions"  # the key of the per-image predictions in a checkpoint's metrics.json
TOP_K = 5
METRIC_KEYS = (RANKING_METRIC, "accuracy", "balanced_accuracy", "val_loss", "top5_accuracy")  # scalars()


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics over the full validation split."""

    macro_f1: float
    accuracy: float
    balanced_accuracy: float
    top5_accuracy: float | None  # only with more than 5 classes
    val_loss: float  # plain cross-entropy, whatever the training loss
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]  # rows = true class, columns = predicted
    # The predicted class of every image, in split order: one integer each, kept with the
    # checkpoint so the report can bootstrap intervals and compare trials image by image.
    predictions: list[int] = field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        """The flat numbers a scheduler or progress line needs."""
        out = {
            RANKING_METRIC: self.macro_f1,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "val_loss": self.val_loss,
        }
        if self.top5_accuracy is not None:
            out["top5_accuracy"] = self.top5_accuracy
        return out


def top_k_classes(logits: np.ndarray, k: int) -> np.ndarray:
    """Class indices by descending score, ``[N, k]``; of tied scores the lower index
    comes first, as with ``argmax`` in serving code. ``torch.topk`` orders ties
    arbitrarily, and int8 logits (dequantized steps) tie often: the reported macro-F1
    would then not be the one a user recomputes from the same logits."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def compute_metrics(
    labels: np.ndarray,
    topk_preds: np.ndarray,
    losses: np.ndarray,
    class_names: Sequence[str],
) -> EvalMetrics:
    """Compute every validation metric.

    Args:
        labels: True class indices, shape [N].
        topk_preds: Predicted indices sorted by score, shape [N, k] (k >= 1); column 0
            is the argmax.
        losses: Per-sample cross-entropy, shape [N].
        class_names: Names in class-index order.

    Returns:
        The metrics. Classes absent from both labels and predictions score 0, so a
        model that never predicts a class is penalised in macro-F1.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    n_classes = len(class_names)
    indices = list(range(n_classes))
    preds = topk_preds[:, 0]
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=indices, average=None, zero_division=0
    )
    per_class = {
        name: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
        for i, name in enumerate(class_names)
    }
    top5 = None
    if n_classes > TOP_K:
        top5 = float((topk_preds[:, :TOP_K] == labels[:, None]).any(axis=1).mean())
    return EvalMetrics(
        macro_f1=float(np.mean(f1)),
        accuracy=float((preds == labels).mean()),
        # Mean recall over the classes present, as sklearn's balanced_accuracy_score.
        balanced_accuracy=float(np.mean(recall[support > 0])) if support.any() else 0.0,
        top5_accuracy=top5,
        val_loss=float(np.mean(losses)),
        per_class=per_class,
        confusion_matrix=confusion_matrix(labels, preds, labels=indices).tolist(),
        predictions=[int(p) for p in preds],
    )


def format_report(metrics: EvalMetrics) -> str:
    """A per-class table in the spirit of scikit-learn's ``classification_report``."""
    width = max(10, *(len(n) for n in metrics.per_class))
    lines = [f"{'class':>{width}}  precision  recall     f1  support"]
    for name, m in metrics.per_class.items():
        lines.append(
            f"{name:>{width}}  {m.precision:9.3f}  {m.recall:6.3f}  {m.f1:5.3f}  {m.support:7d}"
        )
    total = sum(m.support for m in metrics.per_class.values())
    lines.append(f"{'macro-F1':>{width}}  {'':9}  {'':6}  {metrics.macro_f1:5.3f}  {total:7d}")
    lines.append(
        f"accuracy {metrics.accuracy:.3f}  balanced accuracy {metrics.balanced_accuracy:.3f}"
        + (f"  top-5 {metrics.top5_accuracy:.3f}" if metrics.top5_accuracy is not None else "")
        + f"  val loss {metrics.val_loss:.4f}"
    )
    return "\n".join(lines)
