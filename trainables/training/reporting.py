"""The one small interface through which a trial hands over each epoch: the loop calls
``Reporter.report(result, checkpoint_dir)`` on every rank. ``RayReporter`` passes it to
Ray (Tune's or Ray Train's ``report``), which uploads the checkpoint; ``LocalRunReporter``
serves ``tunecv train`` without Ray. The checkpoint directory is temporary.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from trainables.model.checkpoint import TRAIN_STATE_DIR
from trainables.training.metrics import METRIC_KEYS, PREDICTIONS, RANKING_METRIC, EvalMetrics, format_report


@dataclass(frozen=True)
class EpochResult:
    """What one epoch produced."""

    epoch: int  # 1-based
    train_loss: float
    train_images_per_s: float
    epoch_time_s: float
    lr_head: float
    lr_base: float | None  # None when the base is frozen
    metrics: EvalMetrics
    num_params: int = 0  # the model's size: the report's last tie-break
    trainable_params: int = 0

    def scalars(self) -> dict[str, Any]:
        """The flat numbers schedulers, searchers and progress lines take (keys: ``EPOCH_KEYS``)."""
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_images_per_s": self.train_images_per_s,
            "epoch_time_s": self.epoch_time_s,
            "lr_head": self.lr_head,
            "lr_base": self.lr_base,
            "num_params": self.num_params,
            "trainable_params": self.trainable_params,
            **self.metrics.scalars(),
        }

    def details(self) -> dict[str, Any]:
        """Per-class metrics and the confusion matrix: kept with the epoch's checkpoint."""
        return {
            "per_class": {k: vars(v) for k, v in self.metrics.per_class.items()},
            "confusion_matrix": self.metrics.confusion_matrix,
            PREDICTIONS: self.metrics.predictions,
        }


# Every key of ``EpochResult.scalars()``: what a search keeps of each reported epoch.
EPOCH_KEYS = (*(f.name for f in fields(EpochResult) if f.name != "metrics"), *METRIC_KEYS)


class Reporter(Protocol):
    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        """Receive one epoch. ``checkpoint_dir`` is only set on the chief rank."""


class RayReporter:
    """Forwards each epoch and its checkpoint to Ray, which uploads the checkpoint once.

    In a Ray Train worker every rank calls ``ray.train.report`` (the default) and rank 0
    passes the checkpoint; Ray Train keeps the ones its ``CheckpointConfig`` asks for. The
    search passes Tune's ``report`` and ``Checkpoint`` for trials that train in their
    Tune actor. ``extra`` goes into every result (e.g. the epoch a trial resumed from).
    """

    def __init__(self, report_fn=None, checkpoint_type=None, extra: dict[str, Any] | None = None) -> None:
        import ray.train

        self.report_fn = report_fn or ray.train.report
        self.checkpoint_type = checkpoint_type or ray.train.Checkpoint
        self.extra = dict(extra or {})

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        checkpoint = self.checkpoint_type.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.report_fn({**result.scalars(), **self.extra}, checkpoint=checkpoint)


METRICS_LOG = "metrics.jsonl"
BEST_DIR = "best"
LAST_DIR = "last"


class LocalRunReporter:
    """``tunecv train`` without Ray: one line per epoch on the console and in ``metrics.jsonl``,
    the best checkpoint (by macro-F1, weights only) in ``best/`` and the latest in ``last/``.

    This process is the only writer of ``directory``. A checkpoint is copied to a new
    directory and then renamed into place, so ``best/`` and ``last/`` are always whole.
    """

    def __init__(self, directory: Path, print_fn=None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.print = print_fn
        self.best: EpochResult | None = None

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        if self.print is not None:
            m = result.metrics
            self.print(
                f"epoch {result.epoch:3d}  train_loss {result.train_loss:.4f}  val_loss {m.val_loss:.4f}  "
                f"{RANKING_METRIC} {m.macro_f1:.4f}  acc {m.accuracy:.4f}  "
                f"{result.train_images_per_s:.0f} img/s  {result.epoch_time_s:.1f}s"
            )
        with (self.directory / METRICS_LOG).open("a") as f:
            f.write(json.dumps({**result.scalars(), **result.details(), "timestamp": time.time()}) + "\n")
        improved = self.best is None or result.metrics.macro_f1 > self.best.metrics.macro_f1
        if improved:
            self.best = result
        if checkpoint_dir is not None:
            _replace_dir(checkpoint_dir, self.directory / LAST_DIR)
            if improved:
                _replace_dir(checkpoint_dir, self.directory / BEST_DIR, ignore=TRAIN_STATE_DIR)

    def final_report(self) -> str:
        if self.best is None:
            return "no epoch finished"
        return f"best epoch {self.best.epoch} (by {RANKING_METRIC}):\n" + format_report(self.best.metrics)


def _replace_dir(src: Path, dst: Path, ignore: str | None = None) -> None:
    tmp = dst.with_name(f".{dst.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(ignore) if ignore else None)
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)  # a complete directory under the name at every moment but this rename
    shutil.rmtree(old, ignore_errors=True)
