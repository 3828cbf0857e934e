"""What the driver prints while it searches: one line per trial event, and the search's
status (trials done, running, stopped and failed, the best so far, time against the
budget), as one live line on a terminal or a plain line after each trial's end where
there is none (``ray job logs``); and the driver's heartbeat every ``HEARTBEAT_S``
(``search/drivers.py``).
"""

from __future__ import annotations

import contextlib
import sys
import time

from ray import tune

from search.drivers import HEARTBEAT_S, DriverRecord
from search.run.recorder import COMPLETED, CUT, FAILED, STOPPED
from search.run.trial import FINAL_ERROR_KEY, STORAGE_FULL_KEY, searched_params
from search.study import TRIAL_ID_KEY
from trainables.training.metrics import RANKING_METRIC


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
        self.epochs: dict[str, int] = {}  # the last epoch each trial reported
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
        self.epochs[trial_id] = int(result.get("epoch", 0))
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

    def ended(self, run_id: str, outcome: str, reason: str | None) -> None:
        """The recorder's word on how a trial ended (``TrialRecorder.listeners``)."""
        if outcome == FAILED:
            if run_id not in self.announced:  # already said when announced
                self.print(f"[{run_id}] failed: {reason}")
            return
        epochs = self.epochs.get(run_id, 0)
        self.print(f"[{run_id}] {outcome} after {epochs} epoch(s)" + (f": {reason}" if reason else ""))


class SearchStatus(tune.Callback):
    """The search at a glance. On a terminal a rich live line stays at the bottom while
    the per-trial lines scroll above it; elsewhere the same text is printed as a line
    after each trial ends (a live line would be a stream of carriage returns in a log)."""

    def __init__(self, num_samples: int, time_budget_s: float | None, print_fn=print) -> None:
        self.num_samples = num_samples  # this driver's: a resume counts the trials left to it
        self.time_budget_s = time_budget_s
        self.print = print_fn
        self.started = time.time()
        self.counts = {COMPLETED: 0, STOPPED: 0, FAILED: 0, CUT: 0}
        self.running = 0
        self.best: tuple[float, str] | None = None  # (macro-F1, trial id)
        self.live = None  # the rich Live display, while one is shown

    def __getstate__(self) -> dict:
        return {}  # Tune pickles callbacks into tuner.pkl, which tunecv never restores

    def line(self) -> str:
        done = sum(self.counts.values())
        best = f"best {RANKING_METRIC} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        elapsed = _clock(time.time() - self.started)
        budget = f"{elapsed} of {_clock(self.time_budget_s)}" if self.time_budget_s else elapsed
        return (f"trials {done}/{self.num_samples} done ({self.counts[COMPLETED]} completed, "
                f"{self.counts[STOPPED]} stopped early, {self.counts[FAILED]} failed"
                + (f", {self.counts[CUT]} cut by the time budget" if self.counts[CUT] else "")
                + f"), {self.running} running"
                f" | {best} | {budget}")

    @contextlib.contextmanager
    def shown(self):
        """Show the live line for the block's duration, if stdout is a terminal the
        driver prints to; the line's last state stays on screen."""
        if self.print is not print or not sys.stdout.isatty():
            yield
            return
        from rich.console import Console
        from rich.live import Live

        # redirect_stdout: every other line (ours, Ray's) prints above the live one.
        with Live(_LiveLine(self), console=Console(), refresh_per_second=2, redirect_stdout=True,
                  redirect_stderr=True) as live:
            self.live = live
            try:
                yield
            finally:
                self.live = None

    def on_step_end(self, iteration, trials, **info) -> None:
        self.running = sum(t.status == "RUNNING" for t in trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(RANKING_METRIC)
        if score is not None and score == score and (self.best is None or score > self.best[0]):  # not NaN
            self.best = (float(score), trial.config[TRIAL_ID_KEY])

    def ended(self, run_id: str, outcome: str, reason: str | None) -> None:
        """The recorder's word on how a trial ended (``TrialRecorder.listeners``)."""
        self.counts[outcome] += 1
        self.running = max(0, self.running - 1)
        if self.live is None:
            self.print(f"status: {self.line()}")


class _LiveLine:
    """What rich redraws twice a second: the status's current line."""

    def __init__(self, status: SearchStatus) -> None:
        self.status = status

    def __rich__(self):
        from rich.text import Text

        return Text(self.status.line(), style="bold")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
