"""The finalists: after the search, its best configurations train again with other
seeds, and the best mean over each one's runs wins (``search/results/selection.py``).

On a small validation split the top trials are often within an image or two of each
other: one run's best epoch decides nothing. SMAC's intensification re-runs a
challenger on more seeds before it replaces the incumbent; this does it once, for the
top ``search.finalists.k``. The repeats are queued in the run's own Optuna study
(``Study.enqueue_trial`` with the source trial's parameters, a ``tunecv_finalist_of``
and a ``tunecv_seed`` attribute) and run through Tune like any trial, FIFO and in their
own Tune experiment (``tune/<k>-finalists``), so a resume continues them like any other
trial and the sampler learns from them. The study's ``tunecv_finalists`` attribute
records the choice, once: a resumed driver never chooses again.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from search.config import RunConfig
from search.results.ranking import rank
from search.results.trials import COMPLETED, TrialView, read_epoch_details
from search.storage import RunStore
from search.study import FINALIST_OF, FINALISTS, SEED_KEY
from trainables.data.datasets import DataSplit
from trainables.training.metrics import PREDICTIONS


def choose_finalists(store: RunStore, trials, split: DataSplit, cfg: RunConfig) -> tuple[list[str], str]:
    """The search trials whose configurations run again, best first, and why.

    The top ``k`` completed trials. From ``always_below`` validation images on, a
    finalist must also be one the split cannot tell from the leader (the paired
    bootstrap interval of their difference holds 0): a clear leader needs no repeats.
    """
    from search.results.intervals import paired_difference

    settings = cfg.search.finalists
    top = [t for t in rank(trials) if t.status == COMPLETED and t.finalist_of is None][:settings.k]
    if len(top) < 2:
        return [], f"{len(top)} completed trial(s): nothing to choose between"
    if len(split.val) < settings.always_below:
        return [t.trial_id for t in top], (f"the top {len(top)}: {len(split.val)} validation images "
                                           f"(< search.finalists.always_below {settings.always_below})")
    labels = [s.label for s in split.val]
    predictions = {t.trial_id: _predictions(store, t, len(labels)) for t in top}
    leader = top[0].trial_id
    if predictions[leader] is None:
        return [t.trial_id for t in top], "the leader's checkpoint keeps no predictions: the top trials"
    tied = [leader] + [t.trial_id for t in top[1:] if predictions[t.trial_id] is not None and paired_difference(
        labels, predictions[leader], predictions[t.trial_id], len(split.class_names)).low <= 0]
    if len(tied) < 2:
        return [], f"{leader} leads the next {len(top) - 1} clearly on {len(labels)} validation images"
    return tied, f"the trials {len(labels)} validation images cannot tell from the leader"


def _predictions(store: RunStore, trial: TrialView, n: int) -> list[int] | None:
    found = read_epoch_details(store, trial)
    predictions = found[1].get(PREDICTIONS) if found else None
    return predictions if predictions is not None and len(predictions) == n else None


def enqueue_finalists(study: optuna.Study, trials, chosen: list[str], cfg: RunConfig) -> None:
    """Queue ``repeats`` runs of each chosen trial (seeds ``optim.seed + 1..repeats``), then
    record the choice on the study: the record comes last, so a driver that dies
    between the two chooses again rather than trusting a half-made queue."""
    by_id = {t.trial_id: t for t in trials}
    queued = {(t.user_attrs.get(FINALIST_OF), t.user_attrs.get(SEED_KEY))
              for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for trial_id in chosen:
        for repeat in range(1, cfg.search.finalists.repeats + 1):
            seed = cfg.optim.seed + repeat
            if (trial_id, seed) not in queued:
                study.enqueue_trial(by_id[trial_id].params, user_attrs={FINALIST_OF: trial_id, SEED_KEY: seed})
    study.set_user_attr(FINALISTS, chosen)


def queued_finalists(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finalist runs still to run: queued, or continuations of interrupted ones."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if FINALIST_OF in t.user_attrs]


def chosen_finalists(study: optuna.Study) -> list[str] | None:
    """The recorded choice; None before the search chose."""
    chosen: Any = study.user_attrs.get(FINALISTS)
    return list(chosen) if chosen is not None else None
