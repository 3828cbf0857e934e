"""The study store on object storage (search/study.py:StoreJournal): Optuna's own storage
conformance tests run through it with every write uploaded and every read from a fresh
reader, on a local store and on moto's S3 server; and what makes it linear: each event
is uploaded a bounded number of times, and a reader of a live run sees a prefix."""

import json

import pytest
from optuna.storages.journal import BaseJournalBackend, JournalStorage
from optuna.testing.pytest_storages import StorageTestCase

from search.storage import RunStore
from search.study import StoreJournal, _segment_chain


class _Persisted(BaseJournalBackend):
    """A StoreJournal whose every append is flushed, and whose reads come from a separate
    reader of the store that refreshes after each write: Optuna's tests then check what
    was uploaded, not the writer's memory. A small fanout merges segments every few
    flushes, so the chain is read back from merged parts as well."""

    def __init__(self, store: RunStore, fanout: int) -> None:
        self.writer = StoreJournal(store, fanout=fanout)
        self.reader, self.stale = None, False

    def append_logs(self, logs):
        self.writer.append_logs(logs)
        self.writer.flush()
        self.stale = True

    def read_logs(self, log_number_from):
        if self.reader is None:  # one reader that follows the store, as a live run's reader would
            self.reader = StoreJournal(self.writer.store, writable=False)
        elif self.stale:
            self.reader.refresh()
        self.stale = False
        return self.reader.read_logs(log_number_from)


_COUNT = iter(range(10**6))


@pytest.fixture(params=["local", "s3", "journal_file"])
def storage(request, tmp_path):
    """The study stores tunecv writes to a run: its segments on a filesystem and on S3, and
    Optuna's journal file (a run on a filesystem). A database (``search.storage``) is
    Optuna's ``RDBStorage`` as it is, which Optuna's own CI runs these tests against."""
    if request.param == "journal_file":
        from optuna.storages.journal import JournalFileBackend

        yield JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
        return
    if request.param == "local":
        yield JournalStorage(_Persisted(RunStore.at(str(tmp_path / "run")), fanout=2))
        return
    # Fanout 4 on S3: merges at every 4th flush still, in fewer objects to fetch per read.
    location = f"{request.getfixturevalue('s3_bucket')}/conformance-{next(_COUNT)}"
    yield JournalStorage(_Persisted(RunStore.at(location), fanout=4))


class TestStoreJournalConformance(StorageTestCase):
    """Every test of ``optuna.testing.pytest_storages.StorageTestCase``, on both stores."""


def _events(n: int) -> list[dict]:
    return [{"op_code": 0, "study_name": f"s{i}", "directions": [1]} for i in range(n)]


def test_each_event_is_uploaded_a_bounded_number_of_times_and_a_reader_fetches_few_objects(tmp_path):
    store = RunStore.at(tmp_path / "run")
    journal = StoreJournal(store, fanout=4)
    uploaded = []
    write = store.write_bytes
    object.__setattr__(store, "write_bytes", lambda rel, data: (uploaded.append(len(data)), write(rel, data))[1])
    events = _events(700)
    for event in events:  # one flush per event, as the driver does
        journal.append_logs([event])
        journal.flush()
    line = len(json.dumps(events[0], separators=(",", ":"))) + 1
    # Uploaded bytes: each event at level 0, then once per merge level (3): linear in the
    # events, where the whole journal each time would be ~ n^2 / 2 lines (245,000 here).
    assert sum(uploaded) <= (StoreJournal.MAX_LEVEL + 1) * len(events) * (line + 2)
    assert len(uploaded) < 2 * len(events)
    # The last 100 flushes upload no more than the first 100: flat in the study's size.
    assert sum(uploaded[-100:]) <= sum(uploaded[:100]) * 1.5
    names = store.list_names("optuna.journal.d")
    chain = _segment_chain(names, 0)
    assert len(chain) <= (journal.fanout - 1) * StoreJournal.MAX_LEVEL + 700 // journal.fanout ** 3 + 1
    assert chain[-1][1] == len(events)
    assert StoreJournal(store, writable=False).read_logs(0) == events


def test_a_reader_sees_a_prefix_never_a_gap_and_a_resumed_writer_continues_the_chain(tmp_path):
    store = RunStore.at(tmp_path / "run")
    journal = StoreJournal(store, fanout=2)
    events = _events(9)
    for event in events:
        journal.append_logs([event])
        journal.flush()
    segments = tmp_path / "run" / "optuna.journal.d"
    # A segment missing in the middle (a listing that does not show it yet): the chain
    # stops before it, so the reader has a prefix of the journal, never later events.
    (level0,) = [p for p in segments.iterdir() if p.name.startswith("000000000008-")]
    hidden = level0.rename(tmp_path / level0.name)
    assert StoreJournal(store, writable=False).read_logs(0) == events[:8]
    hidden.rename(level0)
    # A new driver of the run (a resume) reads the chain and appends after it.
    resumed = StoreJournal(store, fanout=2)
    assert resumed.read_logs(0) == events
    more = _events(12)[9:]
    resumed.append_logs(more)
    resumed.flush()
    assert StoreJournal(store, writable=False).read_logs(0) == events + more
    # Nothing written is ever rewritten: every name is distinct and holds [first, end).
    for path in segments.iterdir():
        first, end, _ = map(int, path.name.removesuffix(".jsonl").split("-"))
        assert len(path.read_bytes().splitlines()) == end - first


def test_a_study_in_a_database_read_many_times_holds_a_few_connections(tmp_path, postgres_url):
    """A report polled mid-run reads the study again and again: one engine per database
    and process, so PostgreSQL's connections do not run out (they did: "too many clients")."""
    import psycopg

    from search.study import open_study, read_trials

    store = RunStore.at(tmp_path / "run")
    handle = open_study(store, postgres_url)
    handle.study.enqueue_trial({"x": 1.0})
    for _ in range(200):
        assert len(read_trials(store, postgres_url)) == 1
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        (held,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'tunecv'").fetchone()
    assert held <= 6, held  # SQLAlchemy's pool (5) and this probe


def test_openers_of_an_empty_database_at_once_all_get_the_study_tables(postgres_url):
    """Optuna creates its tables on first use; openers racing on an empty database failed
    on the catalogue ("duplicate key ... alembic_version"). 5 rounds of 4 at once, each
    round on a new database, as a first driver and a polled report meet."""
    import psycopg

    from search.study import _database
    from tests.conftest import at_once

    base = postgres_url.rsplit("/", 1)[0]
    for round_ in range(5):
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE race{round_}")
        url, errors = f"{base}/race{round_}", []

        def open_it() -> None:
            try:
                _database.__wrapped__(url).get_all_studies()
            except Exception as err:  # noqa: BLE001 - the assertion names it
                errors.append(repr(err))

        at_once(4, open_it)
        assert errors == [], (round_, errors)
