"""The on-disk record of every trial of a search: what it tried and how it ended.

Each trial owns ``RUN_DIR/trials/<trial_id>/``: ``trial.json`` (its parameters, the
overrides they became, status, failure reason, attempts, timing), ``metrics.jsonl``
(one line per epoch, written by the trial's reporter), ``best/`` (its best checkpoint)
and ``last/`` (its latest epoch with optimizer state: what a retry resumes from). The
run itself has ``search_state.json``: whether a driver is working on it, where, and its
heartbeat. This module owns that layout and its reading and writing, so the report can
be rebuilt and a search resumed from disk alone. It does not rank or format anything.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from trainables.datasets import SPLIT_FILE, SPLIT_META_FILE  # noqa: F401 - the layout, in one place
from trainables.reporting import BEST_DIR, LAST_DIR, METRICS_FILE  # noqa: F401

CONFIG_FILE = "config.yaml"  # the run's resolved config
SPACE_FILE = "space.yaml"  # copy of the search space, so the run is self-contained
TRIALS_DIR = "trials"
RECORD_FILE = "trial.json"
STATE_FILE = "search_state.json"

RUNNING, COMPLETED, STOPPED_EARLY, FAILED, INTERRUPTED = (
    "running", "completed", "stopped_early", "failed", "interrupted",
)
TERMINAL = (COMPLETED, STOPPED_EARLY, FAILED)  # a resumed search never runs these again
HEARTBEAT_S = 10.0  # how often a live driver touches search_state.json
STALE_AFTER_S = 60.0  # a driver on another host that has been silent this long is dead


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search saw it."""

    trial_id: str
    params: dict[str, Any]  # the searcher's flat parameters
    overrides: dict[str, Any]  # the nested config overrides they became
    max_epochs: int
    status: str = RUNNING
    reason: str | None = None  # why it failed, in one line
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    attempts: int = 1  # 2+ after a crash (retry) or a driver resume continued it
    resumed_from_epoch: int | None = None  # the last/ epoch the latest attempt started from
    failures: list[str] = field(default_factory=list)  # why earlier attempts ended
    hostname: str | None = None  # where the latest attempt runs (its driver process for
    pid: int | None = None  # multi-worker trials): what to look at, or kill, by hand


def trial_dir(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / TRIALS_DIR / trial_id


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader never sees half a file


def write_record(run_dir: Path, record: TrialRecord) -> None:
    directory = trial_dir(run_dir, record.trial_id)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / RECORD_FILE, json.dumps(asdict(record), indent=2, default=str))


def read_record(run_dir: Path, trial_id: str) -> TrialRecord:
    return TrialRecord(**json.loads((trial_dir(run_dir, trial_id) / RECORD_FILE).read_text()))


def finish_record(run_dir: Path, trial_id: str, status: str, reason: str | None = None) -> TrialRecord:
    """Set a terminal status, unless the trial already recorded one itself."""
    record = read_record(run_dir, trial_id)
    if record.status != RUNNING:
        return record
    record = replace(record, status=status, reason=reason, end_time=time.time())
    write_record(run_dir, record)
    return record


def read_records(run_dir: Path) -> list[TrialRecord]:
    """Every trial record under the run, in trial-id order."""
    root = Path(run_dir) / TRIALS_DIR
    if not root.is_dir():
        return []
    return [
        TrialRecord(**json.loads(p.read_text())) for p in sorted(root.glob(f"*/{RECORD_FILE}"))
    ]


def read_epochs(run_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    """The trial's per-epoch results; a half-written last line is ignored."""
    path = trial_dir(run_dir, trial_id) / METRICS_FILE
    if not path.is_file():
        return []
    epochs = []
    for line in path.read_text().splitlines():
        try:
            epochs.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the trial was killed mid-write; everything before is intact
    return epochs


def write_state(run_dir: Path, **state: Any) -> None:
    """The search's own status (running/finished), for reports of unfinished runs."""
    _atomic_write(Path(run_dir) / STATE_FILE, json.dumps(state, indent=2, default=str))


def read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def driver_is_alive(run_dir: Path) -> bool:
    """True while a driver works on the run: by pid on its own host, else by heartbeat."""
    return state_shows_live_driver(read_state(run_dir))


def state_shows_live_driver(state: dict[str, Any]) -> bool:
    """``driver_is_alive`` for a ``search_state.json`` already read (e.g. from a bucket)."""
    if state.get("status") != "running":
        return False
    if state.get("hostname") != socket.gethostname():
        return time.time() - float(state.get("heartbeat", 0.0)) < STALE_AFTER_S
    try:
        os.kill(int(state["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def newest_unfinished(states: dict[str, dict]) -> str | None:
    """Of ``{run directory name: its search_state}``, the newest run whose search never
    finished and whose driver is gone (a run with a live driver is left to it). Names
    end in their start time, so they sort by it."""
    for name in sorted(states, reverse=True):
        state = states[name]
        if state.get("status") not in (None, "finished") and not state_shows_live_driver(state):
            return name
    return None
