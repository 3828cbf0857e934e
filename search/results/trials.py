"""A run's trials as a reader sees them, derived and never stored twice: status from the
Optuna state of each run-level id's latest trial (and whether a driver is alive),
epochs from its ``epoch_NNNN`` attributes, per-class metrics from the checkpoint Ray
kept. It reads through ``RunStore``, so it serves a local run or a bucket, during the
search or after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.config import RunConfig
from search.drivers import live_driver, read_drivers
from search.layout import SPACE, join
from search.run.trial import searched_params, trial_config
from search.space.catalog import parse_space
from search.space.model import SearchSpace
from search.storage import RunStore, read_config
from search.study import (
    BUDGET_CUT,
    CHECKPOINT,
    FAILURES,
    FINALIST_OF,
    REASON,
    SEED_KEY,
    TIMESTAMP,
    attempts_by_id,
    read_trials,
    recorded_epochs,
)
from trainables.model.checkpoint import METRICS_FILE
from trainables.config import TrialConfig
from trainables.training.metrics import RANKING_METRIC

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
CUT = "cut"  # the time budget stopped it before its first epoch: not a failure
RUNNING, INTERRUPTED, QUEUED = "running", "interrupted", "queued"
_STATUS = {TrialState.COMPLETE: COMPLETED, TrialState.PRUNED: STOPPED_EARLY, TrialState.FAIL: FAILED}


@dataclass(frozen=True)
class TrialView:
    """One trial of the run, over all its attempts."""

    trial_id: str
    params: dict[str, Any]  # the searcher's flat parameters
    config: TrialConfig  # the run's settings with this trial's overrides: what it trained
    status: str  # completed | stopped_early | failed | cut | running | interrupted | queued
    reason: str | None  # why it failed or was stopped, in one line
    failures: tuple[str, ...]  # why earlier attempts ended (crash retries, drivers that died)
    epochs: tuple[dict[str, Any], ...]  # per-epoch scalars, timestamp and checkpoint, in order
    wall_time_s: float  # summed over attempts
    finalist_of: str | None = None  # a finalist repeat: the search trial whose configuration it runs again

    @property
    def attempts(self) -> int:
        return len(self.failures) + 1

    @property
    def best_epoch(self) -> dict[str, Any] | None:
        """The epoch with the best macro-F1; the first one wins a tie (it got there sooner)."""
        return max(self.epochs, key=lambda e: e[RANKING_METRIC], default=None)

    @property
    def num_params(self) -> int | None:
        return self.epochs[-1].get("num_params") if self.epochs else None

    def checkpoints_by_rank(self) -> list[str]:
        """This trial's recorded checkpoints, best macro-F1 first (earlier epoch on a tie).

        Ray keeps the best one; a reader that finds a listed one gone (Ray deleted it, a
        tie went the other way) takes the next.
        """
        ranked = sorted(self.epochs, key=lambda e: (-e[RANKING_METRIC], e["epoch"]))
        return [e[CHECKPOINT] for e in ranked if e.get(CHECKPOINT)]


@dataclass(frozen=True)
class RunView:
    """A run as it stands: its config and its trials."""

    store: RunStore
    config: RunConfig
    trials: tuple[TrialView, ...]
    space: SearchSpace | None = None  # None until the first driver wrote space.yaml
    space_text: str = ""


def load_run(store: RunStore) -> RunView:
    """Read the run's config, space, drivers and study into views (no weights are read)."""
    config = read_config(store, check_paths=False)
    searching = live_driver(read_drivers(store)) is not None
    if not store.exists(SPACE):  # the first driver is still scanning the data
        return RunView(store, config, ())
    space_text = store.read_text(SPACE)
    space = parse_space(space_text, store.uri(SPACE), check_depths=False)
    base = config.trial().model_dump(mode="json")
    views = []
    for trial_id, attempts in attempts_by_id(read_trials(store, config.search.storage)).items():
        latest = attempts[-1]
        params = searched_params(latest.params)
        views.append(TrialView(
            trial_id=trial_id,
            params=params,
            config=trial_config(base, space.to_overrides(params), latest.user_attrs.get(SEED_KEY)),
            status=_status(latest, searching),
            reason=latest.user_attrs.get(REASON),
            failures=tuple(latest.user_attrs.get(FAILURES, ())),
            epochs=tuple(recorded_epochs(latest)),
            wall_time_s=sum(_wall_time(t) for t in attempts),
            finalist_of=latest.user_attrs.get(FINALIST_OF),
        ))
    return RunView(store, config, tuple(views), space, space_text)


def _status(latest: FrozenTrial, searching: bool) -> str:
    if latest.state == TrialState.FAIL and latest.user_attrs.get(BUDGET_CUT):
        return CUT
    if latest.state in _STATUS:
        return _STATUS[latest.state]
    if latest.state == TrialState.WAITING:
        return QUEUED
    return RUNNING if searching else INTERRUPTED


def _wall_time(trial: FrozenTrial) -> float:
    """From its ask to its end, or to its last epoch while it runs."""
    if trial.datetime_start is None:
        return 0.0
    if trial.datetime_complete is not None:
        end = trial.datetime_complete.timestamp()
    else:
        epochs = recorded_epochs(trial)
        end = epochs[-1][TIMESTAMP] if epochs else 0.0
    return max(0.0, end - trial.datetime_start.timestamp())


def read_epoch_details(store: RunStore, trial: TrialView) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(best epoch, its per-class metrics and confusion matrix) from the checkpoint Ray kept."""
    for rel in trial.checkpoints_by_rank():
        try:
            details = store.read_json(join(rel, METRICS_FILE))
        except FileNotFoundError:
            continue  # deleted by Ray since the study recorded it
        return next(e for e in trial.epochs if e.get(CHECKPOINT) == rel), details
    return None
