"""The Tune trainable: the searcher's flat parameters -> a ``TrialConfig`` (the run's
fixed settings with the space's overrides on top) -> a ``TrialRunner``. The trial
writes no file of its own. Its exceptions propagate, so Tune retries it or the driver
records the failure; a ``FinalTrialError`` (a config that cannot train, a run past
``search.trial_timeout_s``) is announced first in a result of its own, so the driver
ends it without a retry (``TrialRecorder``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search.layout import SPLIT, trial_dir
from search.space.model import SearchSpace
from search.storage import RunStore, out_of_space
from search.study import RESUME_FROM_KEY, SEED_KEY, TRIAL_ID_KEY
from trainables.config import TrialConfig
from trainables.errors import FinalTrialError, TrialConfigError, TrialTimeoutError, nested_errors

# A result holding only this key says the trial is about to raise a FinalTrialError:
# "<ErrorClass>: message". Tune's FailureConfig retries every error alike.
FINAL_ERROR_KEY = "tunecv_final_error"
# ...or that the run's filesystem is full: the run stops (resumable), no trial fails.
STORAGE_FULL_KEY = "tunecv_storage_full"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a driver shares; passed once through ``tune.with_parameters``."""

    run: RunStore
    driver: int  # k: this driver's Tune experiment is tune/<k>
    base_config: dict[str, Any]  # TrialConfig as JSON: the run's fixed settings
    space: SearchSpace
    timeout_s: float | None = None  # search.trial_timeout_s: each attempt's wall-clock limit
    finalists: bool = False  # the finalists' phase: its own Tune experiment (search/layout.py)


def trial_config(base_config: dict[str, Any], overrides: dict[str, Any], seed: int | None = None) -> TrialConfig:
    """The fully resolved config of one trial: each section's fields, then the space's
    overrides, then ``seed`` (a finalist repeat's) for ``optim.seed``."""
    merged = {name: {**fields, **overrides.get(name, {})} for name, fields in base_config.items()}
    if seed is not None:
        merged["optim"] = {**merged["optim"], "seed": seed}
    return TrialConfig.model_validate(merged)


def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config without tunecv's own keys: what the space suggested."""
    return {k: v for k, v in config.items() if k not in (TRIAL_ID_KEY, RESUME_FROM_KEY, SEED_KEY)}


def run_search_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: run one trial of the search.

    Args:
        params: The searcher's parameters, the run-level trial id and, for a trial a
            later driver continues, the checkpoint to continue from.
        context: The run's shared settings.
    """
    from search.run.runners import create_runner

    # Ray logs every persisted checkpoint at INFO: one line per epoch per trial would
    # drown the search's own progress lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    try:
        cfg = trial_config(context.base_config, context.space.to_overrides(searched_params(params)),
                           params.get(SEED_KEY))
    except ValueError as err:
        _fail_for_good(TrialConfigError(f"the space gave an invalid trial config: {err}"), err)
    trial_store = context.run.child(trial_dir(context.driver, params[TRIAL_ID_KEY], context.finalists))
    resume_from = params.get(RESUME_FROM_KEY)
    runner = create_runner(cfg, context.run.uri(SPLIT), trial_store)
    try:
        run_with_timeout(lambda: runner.run(context.run.uri(resume_from) if resume_from else None),
                         context.timeout_s)
    except Exception as err:
        if (full := out_of_space(err)) is not None:
            from ray import tune

            tune.report({STORAGE_FULL_KEY: str(full)})
            raise
        if (final := final_cause(err)) is None:
            raise  # a crash: Tune retries it from the last checkpoint
        _fail_for_good(final, err)


def final_cause(err: BaseException) -> FinalTrialError | None:
    """The ``FinalTrialError`` behind ``err``: itself, or one a Ray Train worker raised
    (the other ranks' errors are its aftermath)."""
    return next((e for e in nested_errors(err) if isinstance(e, FinalTrialError)), None)


def _fail_for_good(final: FinalTrialError, raised: BaseException):
    from ray import tune

    tune.report({FINAL_ERROR_KEY: f"{type(final).__name__}: {final}"})
    raise final from (raised if raised is not final else None)


def run_with_timeout(fn: Callable[[], None], timeout_s: float | None) -> None:
    """Run ``fn``; raise ``TrialTimeoutError`` once it has run ``timeout_s`` seconds.

    ``fn`` runs in a daemon thread, so a step blocked in C (a collective, a stalled
    read) cannot hold this one: the trial fails on time, and Tune ends the actor, its
    thread and, through Ray's ownership, the Ray Train workers it started. Tune's
    reports and stop signals work from any thread (one session per trial process).
    """
    if timeout_s is None:
        fn()
        return
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's own thread
            outcome.append(err)

    worker = threading.Thread(target=target, name="tunecv-trial", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TrialTimeoutError(f"ran past search.trial_timeout_s ({timeout_s:g} s); raise the limit if the "
                                "trial is slow rather than hung")
    if outcome:
        raise outcome[0]
