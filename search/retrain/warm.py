"""What a retrain's search starts from: the champion run's best configurations, run
first, and optionally all its finished trials as the new study's history."""

from __future__ import annotations

from typing import Any

from search.results.selection import selection_order
from search.results.trials import load_run
from search.storage import RunStore
from search.study import HistoryTrial
from trainables.training.metrics import RANKING_METRIC


def top_configurations(store: RunStore, k: int) -> list[dict[str, Any]]:
    """The searcher parameters of the run's ``k`` best trials, best first, in the order its
    export chose (``selection_order``: the best finalist first, else by macro-F1); trials
    that never finished an epoch are left out, and a configuration that ran twice (a
    finalist's repeats) counts once."""
    configurations: list[dict[str, Any]] = []
    for trial in selection_order(load_run(store).trials):
        if trial.best_epoch is None or trial.params in configurations:
            continue
        configurations.append(dict(trial.params))
        if len(configurations) == k:
            break
    return configurations


def history_trials(store: RunStore, source: str) -> list[HistoryTrial]:
    """The run's trials that finished an epoch, each with its best macro-F1, for a new
    study's sampler; ``source`` marks where they come from (the older snapshot)."""
    return [HistoryTrial(dict(t.params), t.best_epoch[RANKING_METRIC], source)
            for t in load_run(store).trials if t.best_epoch is not None]
