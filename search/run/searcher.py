"""The searcher: a plain ``ray.tune.search.Searcher`` over Optuna's public ask-and-tell
API. Ray's ``OptunaSearch`` keys its Optuna trials by Tune's per-driver ids in a private
table and tells Optuna COMPLETE for trials ASHA stopped; ``StudySearcher`` asks the
run's study for each trial, names it by its run-level id, and leaves the telling to
``TrialRecorder``, which also sees errors and retries. The study is its whole state.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from ray.tune.search import Searcher

from search.space.model import SearchSpace
from search.study import FINALIST_OF, RESUME_FROM_KEY, SEED_KEY, TRIAL_ID_KEY, StudyHandle, run_trial_id
from trainables.training.metrics import RANKING_METRIC


class StudySearcher(Searcher):
    """Asks the study for each trial Tune starts; keeps the live Optuna trials for the recorder."""

    def __init__(self, handle: StudyHandle, space: SearchSpace, finalists: bool = False) -> None:
        super().__init__(metric=RANKING_METRIC, mode="max")
        self.handle = handle
        self.space = space
        self.finalists = finalists  # hand out only the queued finalist runs (search/run/finalists.py)
        self.live: dict[str, optuna.Trial] = {}  # run-level id -> the Optuna trial it runs as

    def __getstate__(self) -> dict:
        # Tune pickles its searcher into tuner.pkl; tunecv never restores from that file
        # (a resume reopens the study), so the open study stays out of it.
        return {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Ask the study (queued trials first: warm starts, continuations) for a trial."""
        trial = self.handle.study.ask()
        while self.finalists and FINALIST_OF not in trial.user_attrs:
            # A warm start queued but never reached before the search ended, or a fresh
            # sample: not a finalist's run. It fails with no run-level id, so no reader
            # counts it (attempts_by_id), and the next queued trial is asked for.
            self.handle.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if not any(FINALIST_OF in t.user_attrs for t in self.handle.study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.WAITING,))):
                return Searcher.FINISHED
            trial = self.handle.study.ask()
        self.space.define_by_run(trial)  # a queued trial's parameters are fixed already
        run_id = run_trial_id(trial)
        if TRIAL_ID_KEY not in trial.user_attrs:  # last: until it is set, readers skip the trial
            trial.set_user_attr(TRIAL_ID_KEY, run_id)
        self.live[run_id] = trial
        # The stored study must know this id before any checkpoint of it exists, or a
        # resume after a crash could hand the number to another trial.
        self.handle.flush()
        config = {**trial.params, TRIAL_ID_KEY: run_id}
        for key in (RESUME_FROM_KEY, SEED_KEY):  # a continuation's checkpoint; a finalist repeat's seed
            if trial.user_attrs.get(key) is not None:
                config[key] = trial.user_attrs[key]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Nothing: ``TrialRecorder`` tells the study, with the error text Tune has there."""

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study is the searcher's state (a resume reopens it)."""


def create_sampler(cfg, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (seeded, multivariate, grouped, constant liar) or random.

    Args:
        cfg: The run config (``search.searcher``, ``search.seed``).
        seed_offset: How many trials the study already holds: a resumed search moves the
            seed on, or a random sampler would replay its first points.
    """
    seed = cfg.search.seed + seed_offset
    if cfg.search.searcher == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate+group model the joint, conditional space; constant_liar keeps
    # concurrent trials from all sampling the same promising point.
    with warnings.catch_warnings():  # group= is "experimental" but documented for this use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=startup_trials(cfg.search.num_samples))


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the space: a quarter of the budget, 4 to 10.

    Optuna's default, 10, suits searches of hundreds of trials; a 12-trial CPU search
    would then be random search with 2 TPE trials at the end (bench/search_efficiency.py
    measured exactly that: TPE and random ran the same first 10 trials). Warm-start
    recipes and stopped trials count towards it, as in Optuna.
    """
    return min(10, max(4, num_samples // 4))
