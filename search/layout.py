"""Every path in a run location, and the one process that writes it.

A run lives at ``output_dir/<name>-<YYYYmmdd-HHMMSS>``: a local directory, a filesystem
shared by every node, or an object-store prefix (``s3://``, ``gs://``). All paths here
are relative to it, with ``/`` separators, so the same names serve every storage.

| path | writer | when |
|---|---|---|
| ``config.yaml``, ``space.yaml``, ``split.parquet``, ``split.json`` | the first driver | once, before any trial |
| ``optuna.journal`` | the live driver (Optuna's journal storage) | on every ask, report and tell |
| ``drivers/<k>.json`` | driver k (the k-th driver of the run) | at start, every 10 s, at its end |
| ``tune/<k>/`` | Ray Tune, for driver k | Tune's own experiment state |
| ``tune/<k>/<trial>/checkpoint_<n>/`` | Ray, from the trial's rank 0 | once per epoch; Ray deletes all but the best and the latest |
| ``tune/<k>/<trial>/train/checkpoint_<time>/`` | Ray Train (multi-worker trials) | as above |
| ``report.parquet``, ``report.md``, ``export/`` | the driver that finishes the search | once, at the end |

Nothing else writes into a run: ``tunecv report`` and ``tunecv export`` read it and
write elsewhere. A checkpoint directory is never modified after Ray wrote it; the study
records which checkpoint each epoch went to (``search/study.py``).
"""

from __future__ import annotations

CONFIG = "config.yaml"  # the run's resolved config
SPACE = "space.yaml"  # the search space, copied in: the run is self-contained
SPLIT = "split.parquet"  # the fixed train/validation split every trial and the export use
SPLIT_META = "split.json"  # its sidecar: class names, skipped files, fingerprint
JOURNAL = "optuna.journal"  # the Optuna study, unless search.storage names a database
DRIVERS = "drivers"
TUNE = "tune"
REPORT_PARQUET = "report.parquet"
REPORT_MARKDOWN = "report.md"
EXPORT = "export"
TRAIN_SUBDIR = "train"  # a multi-worker trial's Ray Train run, inside its Tune trial directory


def driver_state(k: int) -> str:
    """Driver k's state file (k counts from 1: the first driver, then each resume)."""
    return f"{DRIVERS}/{k:03d}.json"


def tune_experiment(k: int) -> str:
    """Driver k's Ray Tune experiment: one per driver, so no file of Ray's has two writers."""
    return f"{TUNE}/{k:03d}"


def trial_dir(k: int, trial_id: str) -> str:
    """Where Ray keeps trial ``trial_id``'s checkpoints while driver k runs it."""
    return f"{tune_experiment(k)}/{trial_id}"


def join(first: str, *rest: str) -> str:
    """``first/a/b`` from non-empty parts (``first`` may be an absolute path or a URI)."""
    return "/".join([first.rstrip("/"), *(p.strip("/") for p in rest if p)]) if rest else first


def run_name(name: str) -> str:
    """A new run's directory name, ``<name>-YYYYmmdd-HHMMSS``: runs sort by start time."""
    import time

    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
