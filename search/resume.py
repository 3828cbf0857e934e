"""Resuming a search whose driver died: what is done, what continues, what is left.

A search is resumable from its run directory alone: the trial records, their
``last/`` checkpoints, the Optuna study (journal file or database) and
``search_state.json``. Nothing is unpickled. This module owns the decision:

- which run to resume (``--resume RUN_DIR``, ``--run-dir``, or the newest unfinished
  run of the same name) and whether its driver is really gone;
- reconciling the study with the records: a trial the dead driver never told Optuna
  about is told now (its record says how it ended) or, if it was still training,
  marked failed in the study and enqueued again under its own id, to continue from
  its ``last/`` epoch;
- how many trials are left, how much time, and every epoch reported so far (ASHA's
  rungs are rebuilt from it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from search.config import ConfigError, RunConfig, parse_config
from search.records import (
    CONFIG_FILE,
    COMPLETED,
    FAILED,
    INTERRUPTED,
    LAST_DIR,
    STOPPED_EARLY,
    TERMINAL,
    driver_is_alive,
    read_epochs,
    read_records,
    read_state,
    trial_dir,
    write_record,
)
from search.searcher import TRIAL_ID_KEY, run_trial_id
from search.storage import not_a_run
from trainables.checkpoint import last_checkpoint_epoch
from trainables.metrics import RANKING_METRIC
from trainables.mirror import Mirror



@dataclass(frozen=True)
class ResumePlan:
    """What the next driver of a run still has to do."""

    finished: tuple[str, ...]  # trial ids that will not run again
    continuing: tuple[str, ...]  # interrupted trials, enqueued to continue under their id
    num_samples: int  # trials still to run: the continuing ones plus new ones
    history: dict[str, list[tuple[int, float]]]  # trial id -> (epoch, macro-F1), for ASHA
    study_trials: int  # trials the study held before this resume
    time_budget_s: float | None  # what is left of search.time_budget_s (<= 0: spent)


def stored_config(location: str | Path) -> RunConfig:
    """The config a run was started with (its ``config.yaml``), from a path or a URI."""
    mirror = Mirror.for_location(str(location))
    path = Path(location) / CONFIG_FILE
    text = mirror.read_text(CONFIG_FILE) if mirror else (path.read_text() if path.is_file() else None)
    if text is None:
        raise not_a_run(location)
    return parse_config(yaml.safe_load(text), source=f"'{location}/{CONFIG_FILE}'")


def check_same_config(run_dir: Path, cfg: RunConfig, display: str | None = None) -> None:
    """Refuse to resume a run with other settings: its trials would not be comparable.

    ``display`` names the run in the message (its URI when ``run_dir`` is a local copy).
    """
    display = display or str(run_dir)
    stored = stored_config(run_dir).model_dump(mode="json")
    given = cfg.model_dump(mode="json")
    diffs = sorted(_differences(stored, given))
    if diffs:
        raise ConfigError(
            f"run '{display}' was started with another config; resuming would mix trials "
            f"that are not comparable. Differences: {', '.join(diffs)}. Resume it with "
            f"`tunecv run --resume {display}` (its own config), or start a new run with "
            "another name (--set name=...)."
        )


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key} ({va!r} -> {vb!r})")
    return out


def check_driver_gone(run_dir: Path, display: str | None = None) -> None:
    """Refuse to resume while another driver still works on the run."""
    if driver_is_alive(run_dir):
        state = read_state(run_dir)
        raise ConfigError(
            f"run '{display or run_dir}' is still being searched by pid {state.get('pid')} on "
            f"{state.get('hostname')}; stop that driver first (a driver on another host "
            "counts as dead once its heartbeat is a minute old)."
        )


def plan_resume(run_dir: Path, cfg: RunConfig, study) -> ResumePlan:
    """Reconcile ``study`` with the run's records and say what is left to run.

    A trial the dead driver left RUNNING in the study is:
    - settled, when its record or its epochs say it ended (completed, stopped early,
      or all ``optim.epochs`` done): the study is told, the record finished;
    - otherwise continued: FAIL in the study, enqueued again under its own id. That
      includes a record that says ``failed`` (Tune was about to retry it).
    A record still ``running`` whose study trial is finished (the driver died between
    telling Optuna and its callbacks) is finished from its epochs.

    Args:
        run_dir: The run being resumed.
        cfg: Its config.
        study: Its Optuna study, loaded from the run's storage.
    """
    import optuna

    State = optuna.trial.TrialState
    max_epochs = cfg.optim.epochs
    records = {r.trial_id: r for r in read_records(run_dir)}
    trials = study.get_trials(deepcopy=False)  # read once: enqueues below only add WAITING ones
    latest = {run_trial_id(t): t.number for t in trials}  # numbers ascend: the last one wins
    # Continuations an earlier resume enqueued that no driver has asked for yet.
    continuing = [run_trial_id(t) for t in trials if t.state == State.WAITING and TRIAL_ID_KEY in t.user_attrs]
    for ot_trial in trials:
        trial_id = run_trial_id(ot_trial)
        record = records.get(trial_id)
        epochs = read_epochs(run_dir, trial_id)
        ended = record is not None and (record.status in (COMPLETED, STOPPED_EARLY) or len(epochs) >= max_epochs)
        if ot_trial.state == State.RUNNING and ended and epochs:
            study.tell(ot_trial.number, epochs[-1][RANKING_METRIC])  # only the tell() was missing
            records[trial_id] = _finish(run_dir, record, epochs, max_epochs)
        elif ot_trial.state == State.RUNNING:
            study.tell(ot_trial.number, state=State.FAIL)
            study.enqueue_trial(ot_trial.params, user_attrs={TRIAL_ID_KEY: trial_id})
            continuing.append(trial_id)
            if record is not None:
                records[trial_id] = replace(record, status=INTERRUPTED)
                write_record(run_dir, records[trial_id])
        elif record is not None and record.status not in TERMINAL and trial_id not in continuing:
            if ot_trial.state == State.COMPLETE:
                records[trial_id] = _finish(run_dir, record, epochs, max_epochs)
            elif ot_trial.state == State.FAIL and latest[trial_id] == ot_trial.number:
                # Told FAIL and never enqueued again: Tune gave up on it just before
                # the driver died, before on_trial_error settled the record.
                records[trial_id] = replace(record, status=FAILED, reason=record.reason or "failed (driver died)")
                write_record(run_dir, records[trial_id])
    finished = tuple(sorted(i for i, r in records.items() if r.status in TERMINAL and i not in continuing))
    history = {
        trial_id: _history(run_dir, trial_id, None if trial_id in finished else _last_epoch(run_dir, trial_id))
        for trial_id in records
    }
    budget = cfg.search.time_budget_s
    left = cfg.search.num_samples - len(finished)
    if budget is not None:
        budget -= float(read_state(run_dir).get("spent_s", 0.0))
        if budget <= 0:
            left = 0  # the budget is spent: nothing more starts, the report is rebuilt
    return ResumePlan(
        finished=finished,
        continuing=tuple(continuing),
        num_samples=max(0, left),
        history=history,
        study_trials=len(trials),
        time_budget_s=budget,
    )


def _finish(run_dir: Path, record, epochs: list[dict], max_epochs: int):
    status = record.status if record.status in (COMPLETED, STOPPED_EARLY) else (
        COMPLETED if len(epochs) >= max_epochs else STOPPED_EARLY
    )
    record = replace(record, status=status, end_time=record.end_time or time.time())
    write_record(run_dir, record)
    return record


def _last_epoch(run_dir: Path, trial_id: str) -> int:
    return last_checkpoint_epoch(trial_dir(run_dir, trial_id) / LAST_DIR) or 0


def _history(run_dir: Path, trial_id: str, up_to: int | None) -> list[tuple[int, float]]:
    """The trial's reported (epoch, macro-F1); for a continuing trial only what it keeps."""
    return [
        (e["epoch"], e[RANKING_METRIC])
        for e in read_epochs(run_dir, trial_id)
        if up_to is None or e["epoch"] <= up_to
    ]
