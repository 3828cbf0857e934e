"""The run's own records without Ray: which run a driver takes, the drivers' state, the
study in an object-store journal, and a failed trial's reason."""

import os
import socket
import time
from pathlib import Path

import optuna
import pytest

from search.config import ConfigError, parse_config
from search.drivers import FINISHED, INTERRUPTED, RUNNING, DriverRecord, DriverState, live_driver, read_drivers
from search.layout import CONFIG, CONFIG_DIGEST, SPACE
from search.run.location import check_resumable, locate_run
from search.storage import RunStore, config_digest, read_config, write_config
from search.study import TRIAL_ID_KEY, StoreJournal
from tests.conftest import at_once, small_run_config


def _cfg(tmp_path, **raw):
    (tmp_path / "data").mkdir(exist_ok=True)
    return parse_config(small_run_config(tmp_path / "data", tmp_path / "runs", **raw))


def _run(tmp_path, cfg, name, *, space=True, driver_status=None, pid=None):
    """A run directory as a driver leaves it; ``pid`` None means a process that is gone."""
    store = RunStore.at(tmp_path / "runs" / name)
    write_config(store, cfg)  # config.yaml and its digest, as the driver writes them
    if space:
        store.write_text(SPACE, "backbones: {}\n")
    if driver_status:
        record = DriverRecord(store, 1)
        if driver_status != RUNNING:
            record.finish(driver_status)
        if pid is None:  # the driver's process is gone: its state names a pid nobody has
            store.write_json("drivers/001.json", {**record.state.__dict__, "pid": _dead_pid()})
    return store


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_the_newest_unfinished_run_with_a_dead_driver_is_resumed(tmp_path):
    cfg = _cfg(tmp_path)
    _run(tmp_path, cfg, "t-20261101-000000", driver_status=RUNNING)
    newest = _run(tmp_path, cfg, "t-20261102-000000", driver_status=RUNNING)
    store, resuming = locate_run(cfg, None)
    assert resuming and store == newest
    check_resumable(store, cfg)  # same config, driver gone: allowed


@pytest.mark.parametrize("case", ["finished", "live driver", "set-up never finished", "other name"])
def test_runs_that_must_not_be_taken_over_give_a_new_run(tmp_path, case):
    cfg = _cfg(tmp_path)
    if case == "finished":
        existing = _run(tmp_path, cfg, "t-20261101-000000", driver_status=FINISHED)
    elif case == "live driver":
        existing = _run(tmp_path, cfg, "t-20261101-000000", driver_status=RUNNING, pid=os.getpid())
    elif case == "set-up never finished":  # its driver died while scanning the data
        existing = _run(tmp_path, cfg, "t-20261101-000000", space=False, driver_status=INTERRUPTED)
    else:
        existing = _run(tmp_path, cfg, "other-20261101-000000", driver_status=INTERRUPTED)
    store, resuming = locate_run(cfg, None)
    assert not resuming and store != existing and store.name.startswith("t-")
    if case != "other name":  # named explicitly, it is refused with the reason
        with pytest.raises(ConfigError, match={"finished": "is finished", "live driver": "still being searched",
                                                "set-up never finished": "never finished its set-up"}[case]):
            check_resumable(existing, cfg)


def test_resuming_with_another_config_names_the_differences(tmp_path):
    cfg = _cfg(tmp_path)
    store = _run(tmp_path, cfg, "t-20261101-000000", driver_status=INTERRUPTED)
    other = _cfg(tmp_path, optim={"epochs": 5})
    with pytest.raises(ConfigError, match=r"optim.epochs \(2 -> 5\)"):
        check_resumable(store, other)


def test_a_run_of_a_longer_name_is_not_taken_for_this_one(tmp_path):
    cfg = _cfg(tmp_path)
    # "t-large-..." starts with "t-": it was taken as a run of "t", then refused as "another config".
    longer = _run(tmp_path, _cfg(tmp_path, name="t-large"), "t-large-20261102-000000", driver_status=INTERRUPTED)
    store, resuming = locate_run(cfg, None)
    assert not resuming and store != longer and not store.exists()  # a new run, not created yet
    # The same name with the suffix of a second run in the same second is still this name's.
    same_second = _run(tmp_path, cfg, "t-20261101-000000-1", driver_status=INTERRUPTED)
    assert locate_run(cfg, None) == (same_second, True)
    assert locate_run(_cfg(tmp_path, name="t-large"), None) == (longer, True)


def _files(store: RunStore) -> dict[str, bytes]:
    root = Path(store.location)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_hand_edited_config_is_refused_on_resume_and_a_run_without_a_digest_resumes(tmp_path):
    store = _run(tmp_path, _cfg(tmp_path), "t-20261101-000000", driver_status=INTERRUPTED)
    check_resumable(store, read_config(store))  # as the driver wrote it: resumable
    text = store.read_text(CONFIG)
    recorded = config_digest(text)
    assert store.read_text(CONFIG_DIGEST) == recorded + "\n"
    edited = text.replace("epochs: 2\n", "epochs: 3\n")
    assert edited != text
    store.write_text(CONFIG, edited)
    before = _files(store)
    with pytest.raises(ConfigError) as info:
        check_resumable(store, read_config(store))  # `tunecv run --resume` reads the edited file itself
    assert str(info.value) == (
        f"run '{store}': {store.uri(CONFIG)} was edited after the run started (sha256 {config_digest(edited)[:12]}..., "
        f"but config.sha256 recorded {recorded[:12]}... at its start), so its trials did not run with these values. "
        "Restore the file as it was, or start a new run with the edited settings "
        f"(`tunecv run --config {store.uri(CONFIG)} --set name=NEW_NAME`).")
    assert _files(store) == before  # the refusal wrote nothing
    store.delete(CONFIG_DIGEST)  # a run started before digests were written
    check_resumable(store, read_config(store))


def test_a_driver_on_another_host_is_alive_until_its_heartbeat_is_a_minute_old():
    now = time.time()
    state = DriverState(k=1, status=RUNNING, pid=1, hostname=socket.gethostname() + "-elsewhere",
                        started=now - 100, heartbeat=now - 30, spent_s=70)
    assert live_driver([state]) is state
    stale = DriverState(**{**state.__dict__, "heartbeat": now - 61})
    assert live_driver([stale]) is None


def test_each_driver_writes_its_own_state_file(tmp_path):
    store = RunStore.at(tmp_path / "run")
    first = DriverRecord(store, 1)
    first.finish(INTERRUPTED)
    second = DriverRecord(store, 2)
    second.beat()
    second.beat()
    assert [d.k for d in read_drivers(store)] == [1, 2]
    assert [d.status for d in read_drivers(store)] == [INTERRUPTED, RUNNING]
    assert read_drivers(store)[1].heartbeat == second.state.heartbeat
    files = sorted(p.relative_to(tmp_path / "run" / "drivers").as_posix()
                   for p in (tmp_path / "run" / "drivers").rglob("*") if p.is_file())
    assert files == ["001.json", "001/end.json", "002.json", "002/beat-000002.json"]  # beat 1 deleted


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_drivers_claiming_a_run_at_one_instant_exactly_one_wins(where, tmp_path, request):
    """Two resumes that both found the run resumable: 20 rounds of two threads released
    at once; one becomes driver 2, the other is refused naming it (search/drivers.py)."""
    from search.drivers import RunTakenError

    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('s3_bucket')}/claims"
    for attempt in range(20):
        store = RunStore.at(f"{root}/run-{attempt}")
        DriverRecord(store, 1, settle_s=0).finish(INTERRUPTED)
        won, lost = [], []

        def contend() -> None:
            try:
                won.append(DriverRecord(store, 2, settle_s=0.3))
            except RunTakenError as err:
                lost.append(str(err))

        at_once(2, contend)
        assert len(won) == 1 and len(lost) == 1, (attempt, won, lost)
        assert "was taken at the same moment by another driver, pid" in lost[0] and "drivers/002.json" in lost[0]
        first, second = read_drivers(store)
        assert first.status == INTERRUPTED and second.status == RUNNING
        assert second.started == won[0].state.started  # the winner's start file, not the loser's


# Each contender imports the CLI and the driver (seconds, and uneven under load) before a
# shared start line, then runs `tunecv run --resume RUN` as the console script does.
_CONTENDER = """\
import pathlib, sys, time
import search.cli, search.run.driver
ready, go, run = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.002)
sys.exit(search.cli.main(["run", "--resume", run]))
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_resume_commands_started_at_one_instant_one_searches_the_other_exits_2(where, tmp_path, request):
    """Two real `tunecv run --resume RUN` processes released at one instant: one claims the
    run and goes on to search; the other exits 2 naming it. The winner is then SIGKILLed
    (its process group), and the run is resumable by the next driver."""
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "runs") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/race"
    store = RunStore.at(f"{root}/t-20261101-000000")
    (tmp_path / "data").mkdir()
    cfg = parse_config(small_run_config(tmp_path / "data", root))
    write_config(store, cfg)
    store.write_text(SPACE, "needs_pretrained: false\nbackbones: {test_resnet: {unfreeze_depth: [all]}}\n"
                            "lr_head: {low: 1.0e-3, high: 1.0e-2}\nlr_base: {ratio: {low: 0.5, high: 1.0}}\n"
                            "losses: {ce: {}}\n")
    DriverRecord(store, 1, settle_s=0).finish(INTERRUPTED)
    (tmp_path / "contender.py").write_text(_CONTENDER)
    go, outs = tmp_path / "go", [tmp_path / f"out{i}.txt" for i in range(2)]
    # Output to files, not pipes nobody reads while waiting: a full pipe would stall a contender.
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "contender.py"), str(tmp_path / f"ready{i}"), str(go),
                               store.location], stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
             for i, out in enumerate(outs)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        deadline = time.monotonic() + 90  # a claim takes ~3 s on S3; imports are done
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        exited = [i for i, p in enumerate(procs) if p.poll() is not None]
        assert len(exited) == 1, ("not exactly one contender stopped", read_drivers(store),
                                  [out.read_text()[-1500:] for out in outs])
        loser, winner = procs[exited[0]], procs[1 - exited[0]]
        said = outs[exited[0]].read_text()
        assert loser.returncode == 2, said[-3000:]
        assert f"pid {winner.pid} on {socket.gethostname()}" in said, said
        while len(read_drivers(store)) < 2 and winner.poll() is None:  # its claim may still be settling
            time.sleep(0.1)
        assert winner.poll() is None, outs[1 - exited[0]].read_text()[-3000:]
        first, second = read_drivers(store)
        assert (first.status, second.status, second.pid) == (INTERRUPTED, RUNNING, winner.pid)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    check_resumable(store, cfg)  # driver 2 is gone: the next resume may take the run


def test_a_driver_writes_each_file_once(tmp_path):
    """Its start file keeps the start; the end file is written by the first finish only."""
    store = RunStore.at(tmp_path / "run")
    record = DriverRecord(store, 1)
    start = (tmp_path / "run" / "drivers" / "001.json").read_bytes()
    record.beat()
    record.finish(FINISHED, asha_rungs={"1": {"t0000": 0.5}})
    end = (tmp_path / "run" / "drivers" / "001" / "end.json").read_bytes()
    record.finish(INTERRUPTED)
    assert (tmp_path / "run" / "drivers" / "001.json").read_bytes() == start
    assert (tmp_path / "run" / "drivers" / "001" / "end.json").read_bytes() == end
    [state] = read_drivers(store)
    assert state.status == FINISHED and state.asha_rungs == {"1": {"t0000": 0.5}} and state.spent_s > 0


def test_the_drivers_state_reads_whole_while_it_beats_in_an_object_store(s3_bucket):
    """pyarrow sizes an S3 object before fetching it: a state file rewritten in place came
    back torn to a reader now and then (3 reads in 2,329 over 15 s on moto). Beats are new
    objects, so a reader racing a driver that beats without pause never fails."""
    import threading

    store = RunStore.at(f"{s3_bucket}/beats")
    record = DriverRecord(store, 1, settle_s=0)  # no other driver to wait for
    stop, errors, seen = threading.Event(), [], []

    def beat() -> None:
        while not stop.is_set():
            record.beat()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(read_drivers(store)[-1].heartbeat)
            except Exception as err:  # noqa: BLE001 - every failed read is the finding
                errors.append(repr(err))

    threads = [threading.Thread(target=beat), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert record.beats > 20 and len(seen) > 20
    assert seen == sorted(seen)  # never an older state after a newer one


def test_the_object_store_journal_is_optunas_own_format(tmp_path):
    """What StoreJournal uploads in segments, concatenated, Optuna's file backend (and
    optuna-dashboard) reads; a whole-file journal of an older run still reads."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    store = RunStore.at(tmp_path / "run")
    journal = StoreJournal(store)
    study = optuna.create_study(storage=JournalStorage(journal), study_name="run", direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    trial.set_user_attr(TRIAL_ID_KEY, "t0000")
    trial.report(0.5, step=1)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert not (tmp_path / "run").exists()  # nothing is written before flush
    journal.flush()
    assert not (tmp_path / "run" / "optuna.journal").exists()
    (segment,) = (tmp_path / "run" / "optuna.journal.d").iterdir()
    assert segment.read_bytes() == journal.encoded()
    copy = tmp_path / "optuna.journal"
    copy.write_bytes(StoreJournal(store, writable=False).encoded())
    read = optuna.load_study(study_name="run", storage=JournalStorage(JournalFileBackend(str(copy))))
    (frozen,) = read.trials
    assert frozen.state == optuna.trial.TrialState.PRUNED and frozen.intermediate_values == {1: 0.5}
    assert frozen.user_attrs[TRIAL_ID_KEY] == "t0000" and frozen.value == 0.5
    # An older run's whole-file journal, being appended to: its partial last line is left out.
    old = RunStore.at(tmp_path / "old")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "optuna.journal").write_bytes(copy.read_bytes() + b'{"op_code": 5, "trial_id"')
    reader = StoreJournal(old, writable=False)
    assert reader.encoded() == copy.read_bytes() and len(reader.read_logs(0)) == len(copy.read_bytes().splitlines())
    with pytest.raises(RuntimeError, match="read-only"):
        reader.append_logs([{"op_code": 0}])


def test_a_failed_trials_reason_is_the_last_exception_line_of_its_error_file(tmp_path):
    from search.run.recorder import error_reason

    class Trial:
        error_file = str(tmp_path / "error.txt")

    (tmp_path / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-11-30_05-10-19)\n"
        "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
        '  File "trainables/data/loaders.py", line 101, in create_train_loader\n'
        "    raise ValueError(\n"
        "trainables.data.layouts.DataError: optim.batch_size 1000 is larger than the 128 training images\n"
    )
    assert error_reason(Trial()) == "DataError: optim.batch_size 1000 is larger than the 128 training images"
    Trial.error_file = str(tmp_path / "missing.txt")
    assert "died" in error_reason(Trial())


def test_a_journal_line_a_full_disk_cut_short_is_dropped_before_the_next_write(tmp_path):
    from search.layout import JOURNAL
    from search.study import open_study, read_trials

    store = RunStore.at(tmp_path / "run")
    open_study(store, None).study.enqueue_trial({"x": 1.0})
    journal = tmp_path / "run" / JOURNAL
    whole = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"w","trial_id":0,"us')  # a write ENOSPC stopped
    # Without the cut, this append would glue onto the torn line and no reader could load the study.
    open_study(store, None).study.enqueue_trial({"x": 2.0})
    assert journal.read_bytes().startswith(whole) and journal.read_bytes().endswith(b"\n")
    assert len(read_trials(store, None)) == 2


def test_a_full_disk_and_a_final_error_are_found_behind_rays_wrappers():
    import errno
    import pickle

    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from search.run.trial import final_cause
    from search.storage import out_of_space
    from trainables.errors import TrialConfigError

    full = OSError(errno.ENOSPC, "No space left on device")
    # As they reach the Tune trial: pickled across processes, which drops __cause__.
    assert out_of_space(pickle.loads(pickle.dumps(ControllerError(full)))).errno == errno.ENOSPC
    assert out_of_space(WorkerGroupError("rank 0", {0: full})) is full
    task_error = RayTaskError("f", "traceback", full)
    assert out_of_space(task_error).errno == errno.ENOSPC
    assert out_of_space(RuntimeError("other")) is None and out_of_space(OSError(errno.EIO, "io")) is None
    bad = TrialConfigError("batch")
    assert final_cause(WorkerGroupError("rank 1", {0: RuntimeError("collective aborted"), 1: bad})) is bad
    assert isinstance(final_cause(pickle.loads(pickle.dumps(ControllerError(bad)))), TrialConfigError)
    assert final_cause(WorkerGroupError("rank 0", {0: RuntimeError("crash")})) is None


def test_a_resume_whose_space_no_longer_checks_stops_before_ray_and_stays_resumable(tmp_path):
    """The stored space is checked again on resume (the weights it names may be gone):
    before Ray starts, and the claimed driver ends interrupted, not left running."""
    import ray

    from search.run.driver import run_search
    from search.space.model import SpaceError

    cfg = _cfg(tmp_path)
    store = _run(tmp_path, cfg, "t-20261101-000000", driver_status=INTERRUPTED)  # its space lists no backbone
    with pytest.raises(SpaceError, match="backbones: empty"):
        run_search(cfg, run_dir=store.location)
    assert not ray.is_initialized()
    assert [d.status for d in read_drivers(store)] == [INTERRUPTED, INTERRUPTED]


def test_listing_a_directory_created_while_it_is_listed_names_what_it_holds(tmp_path):
    """pyarrow's local listing with allow_not_found raises FileNotFoundError when the
    directory appears between its failed listing and its existence check (a test polling a
    run its driver was creating hit it in CI). Here the first listing fails as pyarrow's did."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    class CreatedMeanwhile(pafs.FSSpecHandler):
        failed = False

        def get_file_info_selector(self, selector):
            if not CreatedMeanwhile.failed:
                CreatedMeanwhile.failed = True
                raise FileNotFoundError(f"Cannot list directory '{selector.base_dir}'")
            return super().get_file_info_selector(selector)

    (tmp_path / "runs" / "a").mkdir(parents=True)
    store = RunStore.at(tmp_path / "runs")
    store.__dict__["_resolved"] = (pafs.PyFileSystem(CreatedMeanwhile(LocalFileSystem())), store.location)
    assert store.list_names() == ["a"] and CreatedMeanwhile.failed
