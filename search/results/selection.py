"""Which trial the run ships. Without finalists it is the top-ranked trial. With them
(``search.finalists``, ``search/run/finalists.py``) each finalist configuration ran
``1 + repeats`` times with different seeds; the configuration with the best mean of its
runs' macro-F1 wins, and its best run's checkpoint is exported - or, with
``search.finalists.ensemble``, all its runs averaged in one model when that beats their
mean on validation (``search/export/ensemble.py``).

Why a mean over seeds: on a small validation split the top trials are often within an
image or two of each other, and one run's maximum over epochs is mostly luck
(docs/numbers.md). Averaging seeds is SMAC's intensification, done once.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from search.results.ranking import rank, sort_key
from search.results.trials import TrialView
from trainables.training.metrics import RANKING_METRIC

FINALISTS_NOTE = ("The search's best configurations, trained again with other seeds (search.finalists): the one "
                  "with the best mean over its runs is exported, its best run's checkpoint. A single run's best "
                  "epoch on a small validation split is mostly luck; the spread over seeds shows how much.")


@dataclass(frozen=True)
class FinalistGroup:
    """One finalist configuration: the search's trial, then its repeats."""

    source: str  # the search trial the configuration came from
    members: tuple[TrialView, ...]  # the source first, then its repeats in id order

    @property
    def scores(self) -> tuple[float, ...]:
        """Each member's best validation macro-F1 (members with no finished epoch left out)."""
        return tuple(m.best_epoch[RANKING_METRIC] for m in self.members if m.best_epoch is not None)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def spread(self) -> float | None:
        """Standard deviation over its members' scores: the seed noise of this configuration."""
        return statistics.stdev(self.scores) if len(self.scores) >= 2 else None

    def best_member(self) -> TrialView:
        return rank(self.members)[0]


def finalist_groups(trials) -> list[FinalistGroup]:
    """The finalists' groups, best mean first (a group with no score last); empty when
    the run had no finalists."""
    by_id = {t.trial_id: t for t in trials}
    repeats: dict[str, list[TrialView]] = {}
    for trial in trials:
        if trial.finalist_of is not None:
            repeats.setdefault(trial.finalist_of, []).append(trial)
    groups = [FinalistGroup(source, (by_id[source], *sorted(members, key=lambda t: t.trial_id)))
              for source, members in repeats.items() if source in by_id]
    # Ties on the mean go to the search's own order (its better trial first).
    return sorted(groups, key=lambda g: (g.mean is None, -(g.mean or 0.0), sort_key(g.members[0])))


def selection_order(trials) -> list[TrialView]:
    """Every trial in the order the export tries them: the winning group's runs (best
    first), the other groups', then the rest as ranked. Without finalists: the ranking."""
    ranked = rank(trials)
    first = [m for g in finalist_groups(trials) for m in rank(g.members)]
    chosen = {t.trial_id for t in first}
    return first + [t for t in ranked if t.trial_id not in chosen]


def selection_rule(trials) -> str:
    """Why the first trial of ``selection_order`` leads it, in a few words."""
    groups = finalist_groups(trials)
    if groups and groups[0].mean is not None:
        return (f"best run of the best finalist: configuration of {groups[0].source}, mean {RANKING_METRIC} "
                f"{groups[0].mean:.4f} over {len(groups[0].scores)} run(s)")
    return f"top-ranked trial by best validation {RANKING_METRIC}"
