"""Ranking trials: best macro-F1 first; ties go to lower validation loss, then fewer parameters.

Owns the per-trial summary the report shows (best epoch, its metrics, epochs run,
status, wall time, size) built from the records on disk, and the order. Trials with
no finished epoch (failed early, or not started) rank after every trial with a metric,
but are never dropped: the report lists every trial.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.records import BEST_DIR, INTERRUPTED, RUNNING, TrialRecord, driver_is_alive, read_epochs, read_records, trial_dir
from trainables.metrics import RANKING_METRIC


@dataclass(frozen=True)
class TrialSummary:
    """One row of the ranked report."""

    record: TrialRecord
    status: str
    epochs_run: int
    best_epoch: dict[str, Any] | None  # the metrics.jsonl line with the best macro-F1
    wall_time_s: float
    num_params: int | None
    trainable_params: int | None

    @property
    def trial_id(self) -> str:
        return self.record.trial_id

    @property
    def macro_f1(self) -> float:
        return self.best_epoch[RANKING_METRIC] if self.best_epoch else math.nan

    def sort_key(self) -> tuple:
        if self.best_epoch is None:
            return (1, 0.0, 0.0, 0, self.trial_id)
        return (
            0,
            -self.best_epoch[RANKING_METRIC],
            self.best_epoch["val_loss"],
            self.num_params if self.num_params is not None else math.inf,
            self.trial_id,
        )


def _best_epoch(epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for epoch in epochs:  # first epoch wins a tie: it reached the score sooner
        if best is None or epoch[RANKING_METRIC] > best[RANKING_METRIC]:
            best = epoch
    return best


def _param_counts(run_dir: Path, trial_id: str) -> tuple[int | None, int | None]:
    meta = trial_dir(run_dir, trial_id) / BEST_DIR / "meta.json"
    if not meta.is_file():
        return None, None
    data = json.loads(meta.read_text())
    return data.get("num_params"), data.get("trainable_params")


def summarize(run_dir: Path, record: TrialRecord, search_running: bool) -> TrialSummary:
    """A trial's report row, from its record and its metrics on disk."""
    epochs = read_epochs(run_dir, record.trial_id)
    status = record.status
    if status == RUNNING and not search_running:
        status = INTERRUPTED  # the driver died or was stopped while this trial ran
    end = record.end_time
    if end is None:
        end = max((e.get("timestamp", 0.0) for e in epochs), default=record.start_time)
    total, trainable = _param_counts(run_dir, record.trial_id)
    return TrialSummary(
        record=record,
        status=status,
        epochs_run=len(epochs),
        best_epoch=_best_epoch(epochs),
        wall_time_s=max(0.0, end - record.start_time),
        num_params=total,
        trainable_params=trainable,
    )


def rank_trials(run_dir: Path) -> list[TrialSummary]:
    """Every trial of the run, best first."""
    running = driver_is_alive(run_dir)
    rows = [summarize(run_dir, r, running) for r in read_records(run_dir)]
    return sorted(rows, key=TrialSummary.sort_key)
