"""The searcher and the scheduler of a search, and the run-level trial id they share.

Tune names trials ``<random prefix>_<counter>``, new for every driver process, so after
a resume the same trial would get another name. tunecv names a trial after its Optuna
trial instead (``t0007``), carries that name in the trial's config (``TRIAL_ID_KEY``),
and keys everything by it: records, progress lines and ASHA's rungs. A trial that an
interrupted driver left unfinished is enqueued again with its old name, so it keeps
one directory, one report row and one place in each rung.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from trainables.metrics import RANKING_METRIC

TRIAL_ID_KEY = "tunecv_trial_id"  # in every trial's Tune config
OPTUNA_JOURNAL = "optuna.journal"


def run_trial_id(ot_trial) -> str:
    """The run-level id of an Optuna trial (live or frozen)."""
    return ot_trial.user_attrs.get(TRIAL_ID_KEY) or f"t{ot_trial.number:04d}"


def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config without tunecv's own keys: what the space suggested."""
    return {k: v for k, v in config.items() if k != TRIAL_ID_KEY}


class RunIdOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that adds the run-level trial id to each suggested config."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config[TRIAL_ID_KEY] = run_trial_id(self._ot_trials[trial_id])
        return config


class _RunId:
    """A Tune trial as ASHA sees it: keyed by its run-level id."""

    def __init__(self, trial_id: str, trial=None) -> None:
        self.trial_id = trial_id
        self._trial = trial

    def __getattr__(self, name: str):
        return getattr(self._trial, name)


def _keyed(trial) -> _RunId:
    return _RunId(trial.config[TRIAL_ID_KEY], trial)


class RunIdASHA(ASHAScheduler):
    """ASHA whose rungs are keyed by run-level trial id and can be refilled on resume.

    A trial's last epoch (``max_t``) is let through instead of stopped: the trial ends
    by itself right after it, and stopping it there would kill its actor while it
    winds down (a TorchTrainer mid-teardown, which leaks its workers' placement group
    unless Ray's State API is up). Rungs are unchanged: ASHA records nothing for a
    result it stops at ``max_t`` either, and the completed trial's last result reaches
    ``on_trial_complete`` as before.
    """

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, _keyed(trial))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, _keyed(trial), result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, _keyed(trial), result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        super().on_trial_remove(tune_controller, _keyed(trial))

    def replay(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """Put the epochs an earlier driver saw back into the rungs, in their order.

        Each rung keeps the first result a trial reported at or past its milestone,
        exactly as the live run recorded it, so cutoffs after a resume are the ones
        the interrupted run would have used.
        """
        (bracket,) = self._brackets  # one bracket: ASHAScheduler's default, and ours
        for trial_id, results in history.items():
            for epoch, value in results:
                bracket.on_result(_RunId(trial_id), epoch, self._metric_op * value)

    def rungs(self) -> dict[str, dict[str, float]]:
        """Milestone epoch -> {trial id: macro-F1 recorded there}, kept in the run's state."""
        (bracket,) = self._brackets
        return {
            str(int(milestone)): {t: self._metric_op * v for t, v in recorded.items()}
            for milestone, recorded in sorted(bracket._rungs)
        }


def create_storage(storage_url: str | None, run_dir: Path):
    """The Optuna storage: a journal file in the run directory, or an RDB URL."""
    import optuna

    if storage_url is not None:
        return optuna.storages.RDBStorage(storage_url)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(run_dir / OPTUNA_JOURNAL)))


def create_searcher(cfg, space, storage, study_name: str, resuming_after: int = 0) -> RunIdOptunaSearch:
    """TPE (seeded, multivariate, grouped, constant liar) or random over ``space``.

    Args:
        study_name: The run directory's name: one study per run, also in a database
            that many runs share.
        resuming_after: How many trials the study already holds. On resume the warm
            start is not enqueued again (the study holds it, asked or still queued),
            and the seed moves on, or a random sampler would replay its first points.
    """
    import optuna

    s = cfg.search
    seed = s.seed + resuming_after
    if s.searcher == "tpe":
        # multivariate+group model the joint, conditional space; constant_liar keeps
        # concurrent trials from all sampling the same promising point.
        with warnings.catch_warnings():  # group= is "experimental" but documented for this use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    points = space.warm_start_points() if s.warm_start and not resuming_after else None
    return RunIdOptunaSearch(
        space=space.define_by_run,
        metric=RANKING_METRIC,
        mode="max",
        sampler=sampler,
        storage=storage,
        study_name=study_name,
        points_to_evaluate=points or None,
    )


def create_scheduler(cfg) -> RunIdASHA | None:
    if cfg.search.scheduler != "asha":
        return None
    return RunIdASHA(
        time_attr="epoch",
        metric=RANKING_METRIC,
        mode="max",
        max_t=cfg.optim.epochs,
        grace_period=cfg.search.asha.grace_period,
        reduction_factor=cfg.search.asha.reduction_factor,
    )
