"""Ranking trials: best macro-F1 first; ties go to lower validation loss, then fewer parameters.

Trials with no finished epoch (failed early, or not started) rank after every trial
with a metric, but are never dropped: the report lists every trial.
"""

from __future__ import annotations

import math

from search.results.trials import TrialView
from trainables.training.metrics import RANKING_METRIC


def sort_key(trial: TrialView) -> tuple:
    best = trial.best_epoch
    if best is None:
        return (1, 0.0, 0.0, 0, trial.trial_id)
    size = trial.num_params if trial.num_params is not None else math.inf
    return (0, -best[RANKING_METRIC], best["val_loss"], size, trial.trial_id)


def rank(trials) -> list[TrialView]:
    """Every trial, best first."""
    return sorted(trials, key=sort_key)
