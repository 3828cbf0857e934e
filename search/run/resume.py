"""Resuming a search whose driver died, from the run alone and without unpickling
anything. ``plan_resume`` settles each trial the dead driver left RUNNING in the study:
COMPLETE if all its epochs ran, PRUNED if ASHA (rebuilt from the recorded epochs in
arrival order) would have stopped it, else continued: a WAITING copy with the same
parameters, id and kept epochs starts from the newest checkpoint Ray still keeps
(Optuna's ``RetryFailedTrialCallback`` pattern) and the old trial becomes FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import TrialScheduler

from search.config import RunConfig
from search.layout import join
from search.run.scheduler import RunIdASHA
from search.storage import RunStore
from search.study import (
    CHECKPOINT,
    EPOCH_PREFIX,
    FAILURES,
    FINALIST_OF,
    FINALISTS,
    RESUME_FROM_KEY,
    TIMESTAMP,
    TRIAL_ID_KEY,
    StudyHandle,
    attempts_by_id,
    epoch_key,
    recorded_epochs,
    run_trial_id,
)
from trainables.model.checkpoint import RESUMABLE_FILES
from trainables.training.metrics import RANKING_METRIC

INTERRUPTED_REASON = "interrupted: its driver stopped"


@dataclass(frozen=True)
class ResumePlan:
    """What the next driver of a run still has to do."""

    finished: tuple[str, ...]  # trial ids that will not run again
    continuing: tuple[str, ...]  # interrupted trials, queued to continue under their id
    num_samples: int  # trials still to run: the continuing ones plus new ones
    time_budget_s: float | None  # what is left of search.time_budget_s (<= 0: spent)


def plan_resume(handle: StudyHandle, store: RunStore, cfg: RunConfig, scheduler: RunIdASHA | None,
                spent_s: float) -> ResumePlan:
    """Settle the trials a dead driver left running, refill ASHA's rungs, say what is left.

    Args:
        handle: The run's study, opened for writing by this (the new) driver.
        store: The run.
        cfg: Its config.
        scheduler: ASHA, to be refilled; None for FIFO.
        spent_s: Search time earlier drivers spent.
    """
    study = handle.study
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if TRIAL_ID_KEY not in trial.user_attrs:  # the driver died asking for it: it never ran
            study.tell(trial.number, state=TrialState.FAIL)
    latest = _latest_by_id(study)
    kept = {i: _kept_epochs(store, t) for i, t in latest.items()}
    # Finalist runs went FIFO after the search: ASHA never saw them, and they continue.
    searched = {i: epochs for i, epochs in kept.items() if FINALIST_OF not in latest[i].user_attrs}
    decisions = scheduler.replay(_arrivals(searched)) if scheduler else {}
    for trial_id, trial in latest.items():
        if trial.state == TrialState.RUNNING:
            _settle(study, trial, kept[trial_id], decisions.get(trial_id), cfg.optim.epochs)
    handle.flush()
    latest = _latest_by_id(study)
    states = {i: t.state for i, t in latest.items()}
    finished = tuple(sorted(i for i, s in states.items() if s not in (TrialState.WAITING, TrialState.RUNNING)))
    continuing = tuple(sorted(i for i, s in states.items() if s == TrialState.WAITING))
    budget = cfg.search.time_budget_s
    searched = [i for i in finished if FINALIST_OF not in latest[i].user_attrs]  # search.num_samples counts these
    # Once the finalists are chosen the search is over: only their queued runs are left.
    left = 0 if FINALISTS in study.user_attrs else cfg.search.num_samples - len(searched)
    if budget is not None:
        budget -= spent_s
        if budget <= 0:
            left = 0  # the budget is spent: nothing more starts, the report is rebuilt
    return ResumePlan(finished, continuing, max(0, left), budget)


def _latest_by_id(study: optuna.Study) -> dict[str, FrozenTrial]:
    return {i: attempts[-1] for i, attempts in attempts_by_id(study.get_trials(deepcopy=False)).items()}


def _kept_epochs(store: RunStore, trial: FrozenTrial) -> list[dict]:
    """The trial's epochs that survive a resume: all of a finished trial's; a running
    trial's up to the newest one whose checkpoint Ray still keeps whole (it continues
    from there; later epochs are trained again)."""
    epochs = recorded_epochs(trial)
    if trial.state != TrialState.RUNNING:
        return epochs
    for end in range(len(epochs), 0, -1):
        rel = epochs[end - 1].get(CHECKPOINT)
        if rel and all(store.exists(join(rel, name)) for name in RESUMABLE_FILES):
            return epochs[:end]
    return []


def _arrivals(kept: dict[str, list[dict]]) -> list[tuple[str, int, float]]:
    """Every kept epoch as (trial id, epoch, macro-F1), in the order the results arrived."""
    events = [(e[TIMESTAMP], i, e["epoch"], e[RANKING_METRIC]) for i, epochs in kept.items() for e in epochs]
    return [(i, epoch, value) for _, i, epoch, value in sorted(events)]


def _settle(study: optuna.Study, trial: FrozenTrial, kept: list[dict], decision: str | None,
            max_epochs: int) -> None:
    epochs = recorded_epochs(trial)
    if epochs and epochs[-1]["epoch"] >= max_epochs:
        study.tell(trial.number, max(e[RANKING_METRIC] for e in epochs))  # only the tell was lost
        return
    if kept and decision == TrialScheduler.STOP:
        study.tell(trial.number, state=TrialState.PRUNED)  # ASHA would have stopped it there
        return
    trial_id = run_trial_id(trial)
    queued = any(t.state == TrialState.WAITING and t.user_attrs.get(TRIAL_ID_KEY) == trial_id
                 and t.number > trial.number for t in study.get_trials(deepcopy=False))
    if not queued:  # an earlier resume may have queued it and died before the tell below
        study.add_trial(_continuation(trial, kept))
    study.tell(trial.number, state=TrialState.FAIL)


def _continuation(trial: FrozenTrial, kept: list[dict]) -> FrozenTrial:
    """A WAITING copy of ``trial`` that continues from its last kept epoch."""
    attrs = {k: v for k, v in trial.user_attrs.items() if not k.startswith(EPOCH_PREFIX)}
    attrs[FAILURES] = [*attrs.get(FAILURES, []), INTERRUPTED_REASON]
    attrs.pop(RESUME_FROM_KEY, None)
    if kept:
        attrs[RESUME_FROM_KEY] = kept[-1][CHECKPOINT]
    attrs.update({epoch_key(e["epoch"]): e for e in kept})
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=attrs,
        intermediate_values={e["epoch"]: e[RANKING_METRIC] for e in kept},
    )
