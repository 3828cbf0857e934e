"""The driver's record of each trial in the study: a Tune callback, because it sees what
a ``Searcher`` does not (the trial's error text, Tune's retries). Each result becomes
an intermediate value and an ``epoch_NNNN`` attribute with its checkpoint; a retry
adds to ``failures``; the end is COMPLETE (all epochs, valued at the best epoch),
PRUNED (ASHA stopped it, so TPE weighs it as Optuna's own pruners' trials) or FAIL
with its ``reason``. A trial that announces a ``FinalTrialError`` gets no retry: its
Tune trial's retry budget is spent before the error arrives.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from ray import tune

from search.layout import join, trial_dir
from search.run.searcher import StudySearcher
from search.run.trial import FINAL_ERROR_KEY, STORAGE_FULL_KEY
from search.storage import RunStorageFullError, RunStore
from search.study import BUDGET_CUT, CHECKPOINT, FAILURES, REASON, TIMESTAMP, TRIAL_ID_KEY, epoch_key, recorded_epochs
from trainables.training.metrics import RANKING_METRIC
from trainables.training.reporting import EPOCH_KEYS
from trainables.runtime.workers import RESUMED_FROM_EPOCH

_RESULT_KEYS = (*EPOCH_KEYS, RESUMED_FROM_EPOCH, "hostname", "pid")  # Tune adds hostname and pid
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*: ")
TIME_BUDGET_REASON = "stopped when search.time_budget_s ran out"
# How a trial ended, as printed; CUT: the time budget stopped it before its first epoch.
COMPLETED, STOPPED, FAILED, CUT = "completed", "stopped early", "failed", "cut by the time budget"


def error_reason(trial) -> str:
    """The last exception line of the trial's error file, in at most 500 characters."""
    path = trial.error_file
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), None)
    reason = found or (lines[-1] if lines else "the trial process died (see Ray's logs)")
    reason = re.sub(r"^ray\.exceptions\.RayTaskError\((\w+)\)", r"\1", reason)
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", reason)[:500]  # trainables.data.layouts.DataError -> DataError


class TrialRecorder(tune.Callback):
    """Writes every trial event of this driver into the study (see the module docstring)."""

    def __init__(self, searcher: StudySearcher, store: RunStore, driver: int, max_epochs: int,
                 listeners: Sequence[Callable[[str, str, str | None], None]] = (), finalists: bool = False) -> None:
        self.searcher = searcher
        # Told (run id, COMPLETED | STOPPED | FAILED, reason) once the study is: the
        # console says what the study and the report say.
        self.listeners = tuple(listeners)
        self.store = store
        self.driver = driver
        self.max_epochs = max_epochs
        self.finalists = finalists  # the finalists' phase writes its own Tune experiment
        # Trials that announced a FinalTrialError: a result their training thread still
        # sends (it was waiting to report when the timeout fired) is not an epoch of theirs.
        self.ending: set[str] = set()

    def __getstate__(self) -> dict:
        return {}  # Tune pickles callbacks into tuner.pkl, which tunecv never restores

    def _trial(self, trial) -> optuna.Trial:
        return self.searcher.live[trial.config[TRIAL_ID_KEY]]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        ot_trial = self._trial(trial)
        if STORAGE_FULL_KEY in result:
            # Every trial would fail the same way: stop the search, keep it resumable.
            raise RunStorageFullError(f"trial {trial.config[TRIAL_ID_KEY]}: {result[STORAGE_FULL_KEY]}")
        if trial.config[TRIAL_ID_KEY] in self.ending:
            return
        if FINAL_ERROR_KEY in result:
            # Tune decides on a retry from the trial's max_failures alone, when the
            # error arrives; Ray has no per-exception policy (trainables/errors.py).
            trial.max_failures = 0
            self.ending.add(trial.config[TRIAL_ID_KEY])
            ot_trial.set_user_attr(REASON, f"{result[FINAL_ERROR_KEY]} (not retried)")
            self.searcher.handle.flush()
            return
        epoch = int(result["epoch"])
        ot_trial.report(float(result[RANKING_METRIC]), step=epoch)
        record: dict[str, Any] = {k: result[k] for k in _RESULT_KEYS if k in result}
        record[TIMESTAMP] = time.time()
        record[CHECKPOINT] = self._checkpoint(trial.config[TRIAL_ID_KEY], result)
        ot_trial.set_user_attr(epoch_key(epoch), record)
        self.searcher.handle.flush()

    def _checkpoint(self, run_id: str, result: dict) -> str | None:
        """Where this epoch's checkpoint went, relative to the run."""
        if result.get("checkpoint_dir_name"):  # Tune's own checkpoint (in-process trials)
            return join(trial_dir(self.driver, run_id, self.finalists), result["checkpoint_dir_name"])
        if result.get("checkpoint_path"):  # Ray Train's, forwarded by TuneReportCallback
            root = self.store.fs_path().rstrip("/") + "/"
            path = str(result["checkpoint_path"])
            return path[len(root):] if path.startswith(root) else path
        return None

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        ot_trial = self._trial(trial)
        ot_trial.set_user_attr(FAILURES, [*ot_trial.user_attrs.get(FAILURES, []), error_reason(trial)])
        self.searcher.handle.flush()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.finish(trial.config[TRIAL_ID_KEY])

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        announced = self._trial(trial).user_attrs.get(REASON)
        self.finish(trial.config[TRIAL_ID_KEY], reason=announced or error_reason(trial), failed=True)

    def finish(self, run_id: str, reason: str | None = None, failed: bool = False, cut: bool = False) -> None:
        """Tell the study how trial ``run_id`` ended: COMPLETE, PRUNED or FAIL (``cut``: the
        time budget stopped it, a FAIL marked ``BUDGET_CUT`` when it has no epoch yet)."""
        ot_trial = self.searcher.live.pop(run_id)
        epochs = recorded_epochs(ot_trial)
        cut = cut and not failed and not epochs
        if not failed and not epochs and not cut:
            failed, reason = True, reason or "ended without reporting an epoch"
        if reason:
            ot_trial.set_user_attr(REASON, reason)
        if cut:
            ot_trial.set_user_attr(BUDGET_CUT, True)
        study = self.searcher.handle.study
        if failed or cut:
            study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            outcome = CUT if cut else FAILED
        elif epochs[-1]["epoch"] >= self.max_epochs:
            study.tell(ot_trial, max(e[RANKING_METRIC] for e in epochs))  # the checkpoint export uses
            outcome = COMPLETED
        else:
            study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            outcome = STOPPED
        self.searcher.handle.flush()
        for listener in self.listeners:
            listener(run_id, outcome, reason)

    def stop_unfinished(self, reason: str) -> None:
        """Settle the trials Tune stopped without a callback (the time budget ran out)."""
        for run_id in list(self.searcher.live):
            self.finish(run_id, reason=reason, cut=True)
