"""The one small interface through which a trial reports each epoch.

The loop calls ``Reporter.report(result, checkpoint_dir)`` once per epoch on every
rank; what happens next belongs to the caller: ``RunDirReporter`` keeps metrics and the
best checkpoint on disk, ``ConsoleReporter`` also prints (``tunecv train``),
``RayTrainReporter`` hands metrics and the checkpoint to ``ray.train.report``
(TorchTrainer workers), and the search plugs in its own reporter for in-process Tune
trials. The checkpoint directory is temporary: a
reporter that wants it must copy it before returning.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trainables.checkpoint import META_FILE, TRAIN_STATE_DIR
from trainables.metrics import RANKING_METRIC, EvalMetrics, format_report
from trainables.mirror import Mirror


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

    def flat(self) -> dict:
        """Scalars for schedulers and progress lines, plus the full per-class record."""
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_images_per_s": self.train_images_per_s,
            "epoch_time_s": self.epoch_time_s,
            "lr_head": self.lr_head,
            "lr_base": self.lr_base,
            **self.metrics.scalars(),
            "per_class": {k: vars(v) for k, v in self.metrics.per_class.items()},
            "confusion_matrix": self.metrics.confusion_matrix,
        }


class Reporter(Protocol):
    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        """Receive one epoch. ``checkpoint_dir`` is only set on the chief rank."""


METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
LAST_DIR = "last"


class RunDirReporter:
    """Appends every epoch to ``metrics.jsonl`` and keeps the best checkpoint in ``best/``.

    Best is by macro-F1; ``keep_last`` also keeps the latest epoch, with its training
    state, in ``last/``: what a crashed trial resumes from. ``best/`` holds the weights
    alone (the export needs nothing else). With a ``mirror`` (object-store runs) each
    epoch also uploads what it changed, ``directory`` being ``mirror_rel`` in the run.
    """

    def __init__(
        self, directory: Path, keep_last: bool = False, mirror: Mirror | None = None, mirror_rel: str = ""
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.mirror = mirror
        self.mirror_rel = mirror_rel
        self.best: EpochResult | None = None
        self.best_macro_f1 = float("-inf")

    def resume_after(self, epoch: int) -> None:
        """Continue a trial whose ``last/`` is ``epoch``: forget later lines, recall the best.

        A crash between appending an epoch's line and replacing ``last/`` leaves one line
        that the resumed trial will write again; it must not appear twice.
        """
        path = self.directory / METRICS_FILE
        kept, best_epoch = [], None
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # torn last line
            if record["epoch"] <= epoch:
                kept.append(line)
                if record[RANKING_METRIC] > self.best_macro_f1:
                    self.best_macro_f1, best_epoch = record[RANKING_METRIC], record["epoch"]
        path.write_text("".join(line + "\n" for line in kept))
        changed = [METRICS_FILE]
        best, last = self.directory / BEST_DIR, self.directory / LAST_DIR
        if best_epoch == epoch and _checkpoint_epoch(last) == epoch and _checkpoint_epoch(best) != epoch:
            # Killed after keeping last/ but before best/: last/ is that best epoch.
            _replace_dir(last, best, ignore=TRAIN_STATE_DIR)
            changed.append(BEST_DIR)
        self._upload(changed)

    def _upload(self, names: list[str]) -> None:
        if self.mirror is not None:
            self.mirror.push(*(f"{self.mirror_rel}/{name}" for name in names))

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        with (self.directory / METRICS_FILE).open("a") as f:
            f.write(json.dumps({**result.flat(), "timestamp": time.time()}) + "\n")
        improved = result.metrics.macro_f1 > self.best_macro_f1
        if improved:
            self.best = result
            self.best_macro_f1 = result.metrics.macro_f1
        changed = [METRICS_FILE]
        # last/ first: after a crash between the two, best/ is never newer than last/,
        # and resume_after can restore a missing best/ from last/.
        if checkpoint_dir is not None and self.keep_last:
            _replace_dir(checkpoint_dir, self.directory / LAST_DIR)
            changed.append(LAST_DIR)
        if checkpoint_dir is not None and improved:
            _replace_dir(checkpoint_dir, self.directory / BEST_DIR, ignore=TRAIN_STATE_DIR)
            changed.append(BEST_DIR)
        self._upload(changed)


class ConsoleReporter(RunDirReporter):
    """``RunDirReporter`` that also prints one line per epoch (``tunecv train``)."""

    def __init__(self, run_dir: Path, print_fn=print) -> None:
        super().__init__(run_dir, keep_last=True)
        self.print = print_fn

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        m = result.metrics
        self.print(
            f"epoch {result.epoch:3d}  train_loss {result.train_loss:.4f}  "
            f"val_loss {m.val_loss:.4f}  {RANKING_METRIC} {m.macro_f1:.4f}  "
            f"acc {m.accuracy:.4f}  {result.train_images_per_s:.0f} img/s  "
            f"{result.epoch_time_s:.1f}s"
        )
        super().report(result, checkpoint_dir)

    def final_report(self) -> str:
        if self.best is None:
            return "no epoch finished"
        return f"best epoch {self.best.epoch} (by {RANKING_METRIC}):\n" + format_report(
            self.best.metrics
        )


class RayTrainReporter:
    """Forwards each epoch to ``ray.train.report`` (all ranks must call it).

    ``local`` (rank 0 only) also keeps the epoch on disk, e.g. in a search trial's
    directory, so the search's records look the same for one worker or many.
    """

    def __init__(self, local: RunDirReporter | None = None) -> None:
        self.local = local

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.local is not None:
            self.local.report(result, checkpoint_dir)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(result.flat(), checkpoint=checkpoint)


def _checkpoint_epoch(directory: Path) -> int | None:
    meta = directory / META_FILE
    return json.loads(meta.read_text()).get("epoch") if meta.is_file() else None


def _replace_dir(src: Path, dst: Path, ignore: str | None = None) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(ignore) if ignore else None)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)  # readers see the old or the new checkpoint, never half of one
