"""What the driver prints while it searches (one line per trial event), and the
driver's heartbeat every ``HEARTBEAT_S`` (``search/drivers.py``).
"""

from __future__ import annotations

import time

from ray import tune

from search.drivers import HEARTBEAT_S, DriverRecord
from search.run.recorder import error_reason
from search.run.trial import FINAL_ERROR_KEY, STORAGE_FULL_KEY, searched_params
from search.study import TRIAL_ID_KEY
from trainables.metrics import RANKING_METRIC


class Heartbeat(tune.Callback):
    def __init__(self, driver: DriverRecord) -> None:
        self.driver = driver
        self.last = time.time()

    def __getstate__(self) -> dict:
        return {}  # Tune pickles callbacks into tuner.pkl, which tunecv never restores

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.time() - self.last >= HEARTBEAT_S:
            self.last = time.time()
            self.driver.beat()


class ProgressCallback(tune.Callback):
    """One line per epoch, retry and end of every trial."""

    def __init__(self, max_epochs: int, max_failures: int, print_fn=print) -> None:
        self.max_epochs = max_epochs
        self.max_failures = max_failures
        self.print = print_fn
        self.best: dict[str, float] = {}
        self.announced: set[str] = set()  # trials that said they fail for good

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into tuner.pkl; under `ray job submit` Ray has
        # replaced builtins.print by then, and the captured one cannot pickle.
        return {**self.__dict__, "print": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, print=state["print"] or print)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        trial_id = trial.config[TRIAL_ID_KEY]
        if trial_id in self.announced:
            return  # a result the failing trial's thread still sent
        if FINAL_ERROR_KEY in result:
            self.announced.add(trial_id)
            self.print(f"[{trial_id}] failed, not retried: {result[FINAL_ERROR_KEY]}")
            return
        if STORAGE_FULL_KEY in result:
            return  # the driver stops the search and says why
        score = result.get(RANKING_METRIC, float("nan"))
        self.best[trial_id] = max(score, self.best.get(trial_id, float("-inf")))
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(searched_params(trial.config).items()))
        self.print(
            f"[{trial_id}] epoch {result.get('epoch')}/{self.max_epochs} "
            f"{RANKING_METRIC} {score:.4f} (best {self.best[trial_id]:.4f})  {params}"
        )

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.print(
            f"[{trial.config[TRIAL_ID_KEY]}] crashed; retry {trial.num_failures}/"
            f"{self.max_failures} continues from its last checkpoint"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = trial.last_result.get("epoch", 0)
        ended = "completed" if epochs >= self.max_epochs else "stopped early"
        self.print(f"[{trial.config[TRIAL_ID_KEY]}] {ended} after {epochs} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if trial.config[TRIAL_ID_KEY] not in self.announced:  # already said when announced
            self.print(f"[{trial.config[TRIAL_ID_KEY]}] failed: {error_reason(trial)}")

