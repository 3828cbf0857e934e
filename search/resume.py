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
from trainables.checkpoint import has_training_state, read_meta
from trainables.metrics import RANKING_METRIC



@dataclass(frozen=True)
class ResumePlan:
    """What the next driver of a run still has to do."""

    finished: tuple[str, ...]  # trial ids that will not run again
    continuing: tuple[str, ...]  # interrupted trials, enqueued to continue under their id
    num_samples: int  # trials still to run: the continuing ones plus new ones
    history: dict[str, list[tuple[int, float]]]  # trial id -> (epoch, macro-F1), for ASHA
    study_trials: int  # trials the study held before this resume
    time_budget_s: float | None  # what is left of search.time_budget_s


def stored_config(run_dir: Path) -> RunConfig:
    """The config a run was started with (its ``config.yaml``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a tunecv run directory (no {CONFIG_FILE} in it).")
    return parse_config(yaml.safe_load(path.read_text()), source=f"'{path}'")


def check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run with other settings: its trials would not be comparable."""
    stored = stored_config(run_dir).model_dump(mode="json")
    given = cfg.model_dump(mode="json")
    diffs = sorted(_differences(stored, given))
    if diffs:
        raise ConfigError(
            f"run '{run_dir}' was started with another config; resuming would mix trials "
            f"that are not comparable. Differences: {', '.join(diffs)}. Resume it with "
            f"`tunecv run --resume {run_dir}` (its own config), or start a new run with "
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


def check_driver_gone(run_dir: Path) -> None:
    """Refuse to resume while another driver still works on the run."""
    if driver_is_alive(run_dir):
        state = read_state(run_dir)
        raise ConfigError(
            f"run '{run_dir}' is still being searched by pid {state.get('pid')} on "
            f"{state.get('hostname')}; stop that driver first (a driver on another host "
            "counts as dead once its heartbeat is a minute old)."
        )


def find_unfinished_run(output_dir: Path, name: str) -> Path | None:
    """The newest ``output_dir/name-*`` run whose search never finished, if any."""
    if not output_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in output_dir.glob(f"{name}-*") if (p / CONFIG_FILE).is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for run_dir in candidates:
        if read_state(run_dir).get("status") not in (None, "finished"):
            return run_dir
    return None


def plan_resume(run_dir: Path, cfg: RunConfig, study) -> ResumePlan:
    """Reconcile ``study`` with the run's records and say what is left to run.

    Args:
        run_dir: The run being resumed.
        cfg: Its config.
        study: Its Optuna study, loaded from the run's storage.
    """
    import optuna

    State = optuna.trial.TrialState
    records = {r.trial_id: r for r in read_records(run_dir)}
    study_trials = len(study.get_trials(deepcopy=False))
    continuing = []
    for ot_trial in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        trial_id = run_trial_id(ot_trial)
        record = records.get(trial_id)
        if record is not None and record.status in (COMPLETED, STOPPED_EARLY):
            # The trial finished; only the dead driver's tell() is missing.
            epochs = read_epochs(run_dir, trial_id)
            study.tell(ot_trial.number, epochs[-1][RANKING_METRIC]) if epochs else study.tell(
                ot_trial.number, state=State.FAIL
            )
            continue
        study.tell(ot_trial.number, state=State.FAIL)
        if record is not None and record.status == FAILED:
            continue
        study.enqueue_trial(ot_trial.params, user_attrs={TRIAL_ID_KEY: trial_id})
        continuing.append(trial_id)
        if record is not None:
            write_record(run_dir, replace(record, status=INTERRUPTED))
    finished = tuple(sorted(i for i, r in records.items() if r.status in TERMINAL))
    history = {
        trial_id: _history(run_dir, trial_id, None if trial_id in finished else _last_epoch(run_dir, trial_id))
        for trial_id in records
    }
    state = read_state(run_dir)
    budget = cfg.search.time_budget_s
    if budget is not None:
        budget = max(1.0, budget - float(state.get("spent_s", 0.0)))
    return ResumePlan(
        finished=finished,
        continuing=tuple(continuing),
        num_samples=max(0, cfg.search.num_samples - len(finished)),
        history=history,
        study_trials=study_trials,
        time_budget_s=budget,
    )


def _last_epoch(run_dir: Path, trial_id: str) -> int:
    last = trial_dir(run_dir, trial_id) / LAST_DIR
    return int(read_meta(last)["epoch"]) if has_training_state(last) else 0


def _history(run_dir: Path, trial_id: str, up_to: int | None) -> list[tuple[int, float]]:
    """The trial's reported (epoch, macro-F1); for a continuing trial only what it keeps."""
    return [
        (e["epoch"], e[RANKING_METRIC])
        for e in read_epochs(run_dir, trial_id)
        if up_to is None or e["epoch"] <= up_to
    ]
