"""Every path in a run location, relative to it with ``/`` separators, so the same names
serve a local directory, a shared filesystem and an object-store prefix. The table in
docs/run-directory.md names the one writer of each; this module only names them.
"""

from __future__ import annotations

CONFIG = "config.yaml"  # the run's resolved config
CONFIG_DIGEST = "config.sha256"  # config.yaml's digest at the start: a resume refuses a hand-edited config
SPACE = "space.yaml"  # the search space, copied in: the run is self-contained
SPLIT = "split.parquet"  # the fixed train/validation split every trial and the export use
SPLIT_META = "split.json"  # its sidecar: class names, skipped files, fingerprint
JOURNAL = "optuna.journal"  # the Optuna study, unless search.storage names a database
DRIVERS = "drivers"
TUNE = "tune"
REPORT_PARQUET = "report.parquet"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"  # self-contained: plots and plotly.js inside
EXPORT = "export"
GATE_JSON = "gate.json"  # a retrain's champion/challenger decision and its numbers
GATE_MARKDOWN = "gate.md"  # the same, for people; `tunecv report` shows it
TRAIN_SUBDIR = "train"  # a multi-worker trial's Ray Train run, inside its Tune trial directory


def driver_start(k: int) -> str:
    """Driver k's state at its start (k counts from 1: the first driver, then each resume)."""
    return f"{DRIVERS}/{k:03d}.json"


def driver_beats(k: int) -> str:
    """Driver k's directory: its heartbeats and its end file."""
    return f"{DRIVERS}/{k:03d}"


def driver_beat(k: int, n: int) -> str:
    """Driver k's n-th heartbeat (its time and the search time it has spent)."""
    return f"{driver_beats(k)}/beat-{n:06d}.json"


def driver_end(k: int) -> str:
    """Driver k's state at its end: finished or interrupted."""
    return f"{driver_beats(k)}/end.json"


def tune_experiment(k: int, finalists: bool = False) -> str:
    """Driver k's Ray Tune experiment: one per driver and phase (the search, then its
    finalists), so no file of Ray's has two writers."""
    return f"{TUNE}/{k:03d}" + ("-finalists" if finalists else "")


def trial_dir(k: int, trial_id: str, finalists: bool = False) -> str:
    """Where Ray keeps trial ``trial_id``'s checkpoints while driver k runs it."""
    return f"{tune_experiment(k, finalists)}/{trial_id}"


def join(first: str, *rest: str) -> str:
    """``first/a/b`` from non-empty parts (``first`` may be an absolute path or a URI)."""
    return "/".join([first.rstrip("/"), *(p.strip("/") for p in rest if p)]) if rest else first


def run_name(name: str) -> str:
    """A new run's directory name, ``<name>-YYYYmmdd-HHMMSS``: runs sort by start time."""
    import time

    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_run_of(dir_name: str, name: str) -> bool:
    """Whether ``dir_name`` is one of ``run_name(name)``'s (``-N`` after it when two runs
    started in the same second), and not one of a name that starts with ``name-``."""
    import re

    return re.fullmatch(rf"{re.escape(name)}-\d{{8}}-\d{{6}}(-\d+)?", dir_name) is not None
