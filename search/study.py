"""The run's Optuna study: where it is kept, and what tunecv keeps in it. It is the
record of the search: parameters, state (COMPLETE, PRUNED when ASHA stopped the trial,
FAIL), each epoch's macro-F1 as an intermediate value, and user attributes: the
run-level ``tunecv_trial_id`` (stable across drivers: a continued trial is a new
Optuna trial with the same id), ``epoch_NNNN`` (the epoch's scalars and the checkpoint
Ray wrote for it), ``reason``, ``failures`` and, on a continuation,
``tunecv_resume_from``. Only the live driver writes it: on a filesystem through
Optuna's ``JournalFileBackend``, in an object store through ``StoreJournal``, which
uploads the same journal format in append-only segments; ``search.storage`` may name a
database.
"""

from __future__ import annotations

import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import BaseJournalBackend

from search.layout import JOURNAL
from search.storage import RunStore

TRIAL_ID_KEY = "tunecv_trial_id"  # user attribute, and the key in every Tune trial config
RESUME_FROM_KEY = "tunecv_resume_from"  # user attribute of a continuation, and a Tune config key
HISTORY_KEY = "tunecv_history_from"  # user attribute of an earlier search's trial added as history
EPOCH_PREFIX = "epoch_"
CHECKPOINT = "checkpoint"  # in an epoch's record: its checkpoint directory, relative to the run
TIMESTAMP = "timestamp"
REASON, FAILURES = "reason", "failures"
# User attribute of a trial the time budget stopped before its first epoch: FAIL for the
# sampler (it has no value to learn from), "cut" for a reader, who should not look for a bug.
BUDGET_CUT = "tunecv_budget_cut"
# A finalist repeat: user attributes naming the trial whose configuration it re-runs, and
# its seed; the study's FINALISTS attribute records which trials were chosen, once.
FINALIST_OF, SEED_KEY, FINALISTS = "tunecv_finalist_of", "tunecv_seed", "tunecv_finalists"


@dataclass(frozen=True)
class HistoryTrial:
    """A finished trial of an earlier search, added to a new study for its sampler."""

    params: dict[str, Any]
    value: float  # its best macro-F1, on the earlier search's own data
    source: str  # where it comes from (a retrain: the older snapshot's fingerprint)


def epoch_key(epoch: int) -> str:
    return f"{EPOCH_PREFIX}{epoch:04d}"


def run_trial_id(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    """The run-level id of an Optuna trial (live or frozen)."""
    return trial.user_attrs.get(TRIAL_ID_KEY) or f"t{trial.number:04d}"


def attempts_by_id(trials: list[optuna.trial.FrozenTrial]) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """The run's Optuna trials grouped by run-level id, oldest first: the last one counts.

    Only a trial with an id is the run's: ``StudySearcher.suggest`` sets it after the
    last parameter, so a queued warm start, or a trial whose parameters are being
    suggested right now (or were, when a driver died), is left out.
    """
    grouped: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        if TRIAL_ID_KEY in trial.user_attrs:
            grouped.setdefault(trial.user_attrs[TRIAL_ID_KEY], []).append(trial)
    return grouped


def recorded_epochs(trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """The trial's per-epoch records, in epoch order."""
    keys = sorted(k for k in trial.user_attrs if k.startswith(EPOCH_PREFIX))
    return [trial.user_attrs[k] for k in keys]


class StoreJournal(BaseJournalBackend):
    """Optuna's journal on object storage, as append-only segments each uploaded once.

    Object stores have no appends and no locks; the driver is the journal's only writer.
    It keeps the log in memory, and each ``flush`` (after every change it makes: each
    ask, each epoch, each end, so a resume knows every epoch whose checkpoint Ray may
    already have replaced) uploads only the events since the last one, as a new object
    ``optuna.journal.d/<first>-<end>-<level>.jsonl`` holding log numbers [first, end).
    Nothing is ever rewritten: the upload per event is flat, where uploading the whole
    journal each time grew with the study (quadratic in trials; optuna/optuna#6003 was
    closed for that reason).

    So that a reader does not fetch thousands of small objects, every ``fanout``
    consecutive segments of one level are also written merged, as one segment of the
    next level (up to ``MAX_LEVEL``): each event is uploaded at most ``MAX_LEVEL + 1``
    times, and a reader fetches at most ``fanout - 1`` objects per level plus the top
    level's. A reader lists the directory once and follows the chain from log 0, at each
    step taking the segment that starts there and reaches furthest; a missing segment
    ends the chain, so a reader of a live run sees a prefix of the journal, never a gap.

    Runs written before keep a whole-file ``optuna.journal``: it is read as the start of
    the chain and never written again. Concatenated in order the segments are Optuna's
    own journal format (``JournalFileBackend`` reads them).
    """

    MAX_LEVEL = 3

    def __init__(self, store: RunStore, rel: str = JOURNAL, writable: bool = True, fanout: int = 16) -> None:
        if fanout < 2:
            raise ValueError(f"fanout must be at least 2, got {fanout}")
        self.store, self.rel, self.writable, self.fanout = store, rel, writable, fanout
        self.segments_dir = f"{rel}.d"
        legacy = store.read_bytes(rel) if store.exists(rel) else b""
        # A whole file (a filesystem run's, being appended to) may end mid-line: left out.
        self._lines = [line + b"\n" for line in legacy[: legacy.rfind(b"\n") + 1].splitlines() if line.strip()]
        self._base = len(self._lines)  # logs in the whole file; segments start here
        self._chain: list[tuple[int, int, int]] = []  # (first, end, level) of the segments read, in order
        self.refresh()

    def refresh(self) -> None:
        """Read the segments uploaded since this journal last read (one listing, and a GET
        for each new segment): a reader following a live run."""
        chain = _segment_chain(self.store.list_names(self.segments_dir), self.persisted)
        paths = [f"{self.segments_dir}/{_segment_name(*segment)}" for segment in chain]
        if len(paths) > 1 and not self.store.is_local:  # each GET is a round trip: fetch them together
            with ThreadPoolExecutor(min(8, len(paths))) as pool:
                contents = list(pool.map(self.store.read_bytes, paths))
        else:
            contents = [self.store.read_bytes(path) for path in paths]
        for (first, end, level), data in zip(chain, contents):
            self._lines += [line + b"\n" for line in data.splitlines() if line.strip()]
            self._chain.append((first, end, level))

    def read_logs(self, log_number_from: int):
        # Parsed when read, as a file backend does: Optuna's storage replays each log once
        # into its own trials, and a parsed copy kept here as well was 3 times the
        # journal's size (16 MB of 28 for a 1,000-trial journal of 5.3 MB).
        return [json.loads(line) for line in self._lines[log_number_from:]]

    def encoded(self) -> bytes:
        """The whole journal in Optuna's file format: what ``optuna-dashboard`` opens."""
        return b"".join(self._lines)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if not self.writable:
            raise RuntimeError(f"the study in {self.store.uri(self.rel)} was opened read-only.")
        for log in logs:
            self._lines.append(json.dumps(log, separators=(",", ":")).encode("utf-8") + b"\n")

    @property
    def persisted(self) -> int:
        """Log numbers below this one are uploaded."""
        return self._chain[-1][1] if self._chain else self._base

    def flush(self) -> None:
        """Upload the events since the last flush as one new segment, then any merge it completes."""
        if len(self._lines) == self.persisted:
            return
        self._write(self.persisted, len(self._lines), 0)
        while True:
            tail = self._chain[-self.fanout:]
            level = tail[0][2]
            if len(tail) < self.fanout or level >= self.MAX_LEVEL or any(t[2] != level for t in tail):
                return
            del self._chain[-self.fanout:]
            self._write(tail[0][0], tail[-1][1], level + 1)

    def _write(self, first: int, end: int, level: int) -> None:
        data = b"".join(self._lines[first:end])
        self.store.write_bytes(f"{self.segments_dir}/{_segment_name(first, end, level)}", data)
        self._chain.append((first, end, level))


def _segment_name(first: int, end: int, level: int) -> str:
    return f"{first:012d}-{end:012d}-{level}.jsonl"


def _segment_chain(names: list[str], start: int) -> list[tuple[int, int, int]]:
    """The segments to read from log ``start`` on: at each position the one that reaches
    furthest (a merged segment over its parts); the chain ends where none starts."""
    reach: dict[int, tuple[int, int, int]] = {}
    for name in names:
        parts = name.removesuffix(".jsonl").split("-")
        if not name.endswith(".jsonl") or len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue  # a temporary file of a local write in progress, or anything else
        first, end, level = map(int, parts)
        if end > first and (first not in reach or end > reach[first][1]):
            reach[first] = (first, end, level)
    chain, position = [], start
    while position in reach:
        chain.append(reach[position])
        position = reach[position][1]
    return chain


@dataclass
class StudyHandle:
    """An opened study and how to make its writes durable."""

    study: optuna.Study
    journal: StoreJournal | None = None  # set for object-store journals, which need flushing

    def flush(self) -> None:
        """Make every write so far durable (a filesystem journal already is)."""
        if self.journal is not None:
            self.journal.flush()


def _storage(store: RunStore, storage_url: str | None, writable: bool):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if storage_url is not None:
        return _database(storage_url), None
    if writable and store.is_local:
        # A crashed driver can leave the backend's lock behind; the caller made sure no
        # other driver is alive, so it is stale (Optuna would wait 30 s before breaking it).
        Path(store.fs_path()).mkdir(parents=True, exist_ok=True)
        Path(store.fs_path(f"{JOURNAL}.lock")).unlink(missing_ok=True)
        _drop_torn_tail(Path(store.fs_path(JOURNAL)))
        return JournalStorage(JournalFileBackend(store.fs_path(JOURNAL))), None
    journal = StoreJournal(store, writable=writable)
    return JournalStorage(journal), journal


def database_driver_problem(storage_url: str) -> str | None:
    """Why SQLAlchemy cannot load the Python driver of ``storage_url``, with the fix; None if it can."""
    from sqlalchemy.engine import make_url

    url = make_url(storage_url)
    try:
        url.get_dialect().import_dbapi()
    except ImportError as err:
        hint = {"postgresql": "pip install 'psycopg[binary]'", "mysql": "pip install pymysql and use mysql+pymysql://"}
        return (f"the {url.drivername} driver is not installed ({err}); "
                f"{hint.get(url.get_backend_name(), 'install the driver SQLAlchemy names')}.")
    return None


@functools.lru_cache(maxsize=None)
def _database(storage_url: str) -> optuna.storages.RDBStorage:
    """One ``RDBStorage`` (one SQLAlchemy engine and its connection pool) per database and
    process: a new one for each read (a report polled mid-run) kept its connections open
    until garbage collection, and PostgreSQL ran out of them ("too many clients").

    Optuna creates its tables on first use, and two processes doing so at once on an empty
    database race: the loser's CREATE TABLE fails on the catalogue (a report polled while
    a first driver starts, in tests/test_cluster.py). The tables then exist, so the loser
    tries again and finds them."""
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(storage_url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.5)


def _drop_torn_tail(journal: Path) -> None:
    """Cut a last line that a full disk left half-written (no newline). Optuna's reader
    skips such a line, but once another record is appended after it the two read as
    one invalid line and the whole study fails to load. Nothing ever read it."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    with journal.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def open_study(store: RunStore, storage_url: str | None) -> StudyHandle:
    """The run's study for its driver (created on the first run, loaded on a resume)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver prints its own lines
    storage, journal = _storage(store, storage_url, writable=True)
    study = optuna.create_study(storage=storage, study_name=store.name, direction="maximize", load_if_exists=True)
    return StudyHandle(study, journal)


def read_trials(store: RunStore, storage_url: str | None) -> list[optuna.trial.FrozenTrial]:
    """Every Optuna trial of the run, read-only (empty before the first driver made the study)."""
    storage, _ = _storage(store, storage_url, writable=False)
    try:
        study = optuna.load_study(study_name=store.name, storage=storage)
    except KeyError:  # the study does not exist yet
        return []
    return study.get_trials(deepcopy=False)
