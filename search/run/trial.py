"""The Tune trainable: the searcher's flat parameters -> a ``TrialConfig`` (the run's
fixed settings with the space's overrides on top) -> a ``TrialRunner``. The trial
writes no file of its own; its exceptions propagate unchanged, so Tune retries it or
the driver records the failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from search.layout import SPLIT, trial_dir
from search.space.model import SearchSpace
from search.storage import RunStore
from search.study import RESUME_FROM_KEY, TRIAL_ID_KEY
from trainables.config import TrialConfig


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a driver shares; passed once through ``tune.with_parameters``."""

    run: RunStore
    driver: int  # k: this driver's Tune experiment is tune/<k>
    base_config: dict[str, Any]  # TrialConfig as JSON: the run's fixed settings
    space: SearchSpace


def trial_config(base_config: dict[str, Any], overrides: dict[str, Any]) -> TrialConfig:
    """The fully resolved config of one trial: each section's fields, then the space's overrides."""
    merged = {name: {**fields, **overrides.get(name, {})} for name, fields in base_config.items()}
    return TrialConfig.model_validate(merged)


def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config without tunecv's own keys: what the space suggested."""
    return {k: v for k, v in config.items() if k not in (TRIAL_ID_KEY, RESUME_FROM_KEY)}


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
    cfg = trial_config(context.base_config, context.space.to_overrides(searched_params(params)))
    trial_store = context.run.child(trial_dir(context.driver, params[TRIAL_ID_KEY]))
    resume_from = params.get(RESUME_FROM_KEY)
    runner = create_runner(cfg, context.run.uri(SPLIT), trial_store)
    runner.run(context.run.uri(resume_from) if resume_from else None)
