"""A real Ray head (`ray start --head`, loopback, token auth) and what users do with it:
submit a search as a job, kill a search's driver and resume it, survive a trial crash.

Drivers run as separate processes (`python -m search.cli ...`), as they do on a cluster;
the test process never joins this Ray instance.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from search.drivers import read_drivers
from search.results.trials import COMPLETED, FAILED, RUNNING, STOPPED_EARLY, load_run
from search.storage import RunStore
from tests.conftest import small_run_config
from tests.fault_hooks import job_config_env

TERMINAL = (COMPLETED, STOPPED_EARLY, FAILED)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# One family, a learning-rate range and two losses: every trial is a few seconds.
SPACE = {
    "description": "cluster test space",
    "needs_pretrained": False,
    "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
    "lr_head": {"low": 1.0e-3, "high": 1.0e-2},
    "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
    "losses": {"ce": {}, "label_smoothing": {"smoothing": {"low": 0.05, "high": 0.1}}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_bucket):
    """`ray start --head --block` on loopback with token auth; yields the client env.

    Started after the S3 endpoint, so the head's processes inherit its AWS_* variables.
    """
    work = tmp_path_factory.mktemp("head")
    token = work / "auth_token"
    token.write_text(os.urandom(16).hex())
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs_port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         # The job agent's HTTP port is 52365 unless set, and every other Ray on the host
         # (another pytest worker's) wants it too; one that lost it takes no jobs.
         "--dashboard-agent-listen-port", str(agent_port),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(address, env)
        yield {"env": {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}, "address": address, "work": work}
    finally:
        # SIGKILL at once: after SIGTERM, `ray start --block` outlived a 30 s wait in every
        # run, and this head holds nothing worth a graceful stop.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, env: dict) -> None:
    probe = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "from search.jobs.submit import auth_headers; "
        "JobSubmissionClient(sys.argv[1], headers=auth_headers()).submit_job(entrypoint='true')"
    )  # a job, not a listing: the head's job agent may register seconds after the dashboard
    # answers, and Ray refuses a job meanwhile ("No available agent")
    deadline = time.time() + 90
    while True:
        done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"Ray head did not come up: {done.stderr[-2000:]}")
        time.sleep(2)


def _kill_leftovers(temp_dir: str) -> None:
    """Ray processes of this head only (never `ray stop`: it would kill every Ray here)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # exited meanwhile


def _write_config(head, synthetic_root, name: str, output_dir: str | None = None, epochs: int = 4,
                  **search) -> Path:
    work = head["work"] / name
    work.mkdir()
    (work / "space.yaml").write_text(yaml.safe_dump(SPACE))
    raw = small_run_config(
        synthetic_root, output_dir or work / "runs", name=name, optim={"epochs": epochs, "warmup_epochs": 0.5},
        search={"space": str(work / "space.yaml"), "seed": 1, "export": False, **search},
    )
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def _wait_until(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _run(config: Path) -> RunStore | None:
    """The run of ``config`` (the first under its output_dir), local or in the bucket."""
    root = RunStore.at(yaml.safe_load(config.read_text())["output_dir"])
    names = [n for n in root.list_names() if root.child(n).exists("config.yaml")]
    return root.child(names[0]) if names else None


def _trials(config: Path) -> dict:
    run = _run(config)
    return {t.trial_id: t for t in load_run(run).trials} if run and run.exists("space.yaml") else {}


def _checkpointed_epoch(trial) -> int:
    return max((e["epoch"] for e in trial.epochs if e.get("checkpoint")), default=0)


def test_submitted_job_writes_ranked_report_and_model_to_storage(head, synthetic_root):
    """`tunecv submit` through the Job Submission API with the real runtime env file."""
    storage = head["work"] / "shared"
    space = head["work"] / "submit-space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    run_dir = storage / "submitted"
    done = subprocess.run(
        _cli("submit", "--config", "configs/demo.yaml", "--address", head["address"], "--wait",
             "--run-dir", str(run_dir),
             "--set", f"data.root={synthetic_root}", "--set", "data.image_size=32",
             "--set", f"search.space={space}", "--set", "search.num_samples=2", "--set", "search.finalists.k=0",
             "--set", "optim.epochs=2", "--set", "search.asha.grace_period=1", "--set", "optim.batch_size=16"),
        cwd=REPO, env={k: v for k, v in head["env"].items() if k != "RAY_ADDRESS"},
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"report:  {run_dir}/report.md" in done.stdout  # said before the job ran
    table = pq.read_table(run_dir / "report.parquet").to_pylist()
    assert len(table) == 2 and table[0]["rank"] == 1 and table[0]["macro_f1"] > 0.3
    assert (run_dir / "export" / "model.onnx").is_file()
    metrics = json.loads((run_dir / "export" / "metrics.json").read_text())
    assert f"{table[0]['macro_f1']}"[:6] in json.dumps(metrics)


def test_ray_job_submit_runs_the_cli_as_documented(head, synthetic_root):
    """Ray's own `ray job submit --working-dir . -- tunecv run ...`, as docs/cluster.md shows."""
    storage = head["work"] / "shared-cli"
    space = head["work"] / "cli-space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    ray_cli = str(Path(sys.executable).parent / "ray")
    done = subprocess.run(
        [ray_cli, "job", "submit", "--address", head["address"], "--runtime-env", "cluster/runtime_env.yaml",
         "--working-dir", ".", "--", "tunecv", "run", "--config", "configs/demo.yaml",
         "--set", f"output_dir={storage}", "--set", f"data.root={synthetic_root}", "--set", "data.image_size=32",
         "--set", f"search.space={space}", "--set", "search.num_samples=1", "--set", "search.finalists.k=0", "--set", "optim.epochs=1",
         "--set", "search.asha.grace_period=1", "--set", "optim.batch_size=16", "--set", "search.export=false"],
        cwd=REPO, env={k: v for k, v in head["env"].items() if k != "RAY_ADDRESS"},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = storage.glob("demo-*")
    (trial,) = load_run(RunStore.at(run_dir)).trials
    assert trial.status == COMPLETED and (run_dir / "report.md").is_file()


def test_submit_refuses_without_a_token(head):
    """Token auth is on: the same request without the token is rejected."""
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(head["work"])  # no ~/.ray/auth_token there either
    probe = "import sys; from ray.job_submission import JobSubmissionClient; JobSubmissionClient(sys.argv[1]).list_jobs()"
    done = subprocess.run([sys.executable, "-c", probe, head["address"]], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "401" in done.stderr or "nauthorized" in done.stderr or "uthentication" in done.stderr


# tests/stress/killed_driver.py sets this to run the test many times against one head.
STRESS_REPEAT = int(os.environ.get("TUNECV_STRESS_REPEAT", "1"))


@pytest.mark.parametrize("attempt", range(STRESS_REPEAT))
@pytest.mark.parametrize("storage", ["shared_fs", "s3", "postgres"])
def test_killed_driver_resumes_without_rerunning_or_duplicating(head, synthetic_root, s3_bucket, storage, attempt,
                                                                request):
    """``postgres``: the run directory on the filesystem, the study in a real PostgreSQL
    server (``search.storage``)."""
    name = f"resume-{storage.replace('_', '')}-{attempt}"
    database = request.getfixturevalue("postgres_url") if storage == "postgres" else None
    config = _write_config(
        head, synthetic_root, name, output_dir=f"{s3_bucket}/{name}" if storage == "s3" else None,
        num_samples=5, max_concurrent_trials=2, asha={"grace_period": 1, "reduction_factor": 2},
        **({"storage": database} if database else {}),
    )
    first = subprocess.Popen(_cli("run", "--config", str(config)), env=head["env"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def one_done_one_mid_training():
        trials = _trials(config)
        done = [t for t in trials.values() if t.status in TERMINAL]
        mid = [i for i, t in trials.items() if t.status == RUNNING and 1 <= _checkpointed_epoch(t) < 3]
        return mid if done and mid else None

    mid = _wait_until(one_done_one_mid_training, 600, "a finished and a checkpointed running trial", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2)  # Ray stops the dead driver's trials; let their last writes land
    run = _run(config)
    before = {t.trial_id: t for t in load_run(run).trials}
    finished_before = {i: t.epochs for i, t in before.items() if t.status in TERMINAL}
    assert read_drivers(run)[-1].status == "running"  # the driver never got to say otherwise

    second = subprocess.run(_cli("run", "--config", str(config)), env=head["env"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    (resumed,) = [l.split(": ", 1)[1] for l in second.stdout.splitlines() if l.startswith("resuming run directory: ")]
    assert resumed == run.location

    trials = {t.trial_id: t for t in load_run(run).trials}
    assert len(trials) == 5  # the total as asked, each id once
    assert all(t.status in (COMPLETED, STOPPED_EARLY) for t in trials.values()), [
        (t.trial_id, t.status, t.reason) for t in trials.values()]
    for trial_id, epochs in finished_before.items():  # finished trials were not re-run
        assert trials[trial_id].epochs == epochs and trials[trial_id].attempts == 1
    for t in trials.values():  # each epoch once, in order, continued trials included
        assert [e["epoch"] for e in t.epochs] == list(range(1, len(t.epochs) + 1))

    # TPE continued from one study: both drivers' trials are in it. Each trial the
    # killed driver left running is FAIL there and ends again under its own id; every
    # trial of the report has exactly one COMPLETE or PRUNED entry.
    import optuna

    from search.study import read_trials, run_trial_id

    State = optuna.trial.TrialState
    study_trials = read_trials(run, database)
    ended = [run_trial_id(t) for t in study_trials if t.state in (State.COMPLETE, State.PRUNED)]
    interrupted = [run_trial_id(t) for t in study_trials if t.state == State.FAIL]
    assert sorted(ended) == sorted(trials)
    assert set(interrupted).isdisjoint(finished_before)
    assert all(t.state in (State.COMPLETE, State.PRUNED, State.FAIL) for t in study_trials)
    # Interrupted trials ran a second attempt; those killed mid-training continued from
    # their checkpoint. A trial that had in fact ended, with only the driver's tell
    # missing, is settled, not re-run: ASHA decides before Tune's callbacks record the
    # epoch, so a trial seen RUNNING at a milestone may already have been stopped there.
    rungs = read_drivers(run)[-1].asha_rungs
    for t in trials.values():
        assert t.attempts == (2 if t.trial_id in interrupted else 1), t
        if t.trial_id not in mid:
            continue
        if t.trial_id in interrupted:
            assert max(e.get("resumed_from_epoch") or 0 for e in t.epochs) >= 1, t
        else:  # settled by the replayed ASHA
            assert t.status == STOPPED_EARLY and str(t.epochs[-1]["epoch"]) in rungs, t

    # ASHA's rungs: every trial that reached a milestone sits in it once, with the
    # macro-F1 it had there, whichever driver saw it.
    for milestone, recorded in rungs.items():
        expected = {t.trial_id: next(e["macro_f1"] for e in t.epochs if e["epoch"] >= int(milestone))
                    for t in trials.values() if t.epochs and t.epochs[-1]["epoch"] >= int(milestone)}
        assert recorded == pytest.approx(expected), (milestone, recorded, expected)


def test_two_drivers_on_one_database_each_search_their_own_study(head, synthetic_root, postgres_url):
    """Two `tunecv run` at once, one PostgreSQL database: each run's study holds its own
    trials and nothing of the other's."""
    import optuna

    from search.study import read_trials, run_trial_id

    # One epoch a trial: what is checked is whose study holds which trial, not training.
    configs = [_write_config(head, synthetic_root, f"database-{i}", epochs=1, num_samples=2, max_concurrent_trials=1,
                             scheduler="fifo", storage=postgres_url) for i in range(2)]
    drivers = [subprocess.Popen(_cli("run", "--config", str(c)), env=head["env"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in configs]
    for driver in drivers:
        output, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, output[-3000:]
    runs = [_run(c) for c in configs]
    for run in runs:
        trials = load_run(run).trials
        assert [t.trial_id for t in trials] == ["t0000", "t0001"]
        assert all(t.status == COMPLETED and len(t.epochs) == 1 for t in trials), [(t.trial_id, t.status) for t in trials]
        study = read_trials(run, postgres_url)
        assert sorted(run_trial_id(t) for t in study) == ["t0000", "t0001"]
        assert not run.exists("optuna.journal") and not run.exists("optuna.journal.d")  # the study is in the database
    names = {s.study_name for s in optuna.get_all_study_summaries(postgres_url)}
    assert {run.name for run in runs} <= names


@pytest.mark.parametrize("attempt", range(STRESS_REPEAT))
def test_killed_driver_finishes_its_finalists_without_rerunning_one(head, synthetic_root, attempt):
    """The driver dies during the finalists: one repeat finished, the other mid-training.
    The next driver starts no search trial, keeps the finished repeat as it was and
    continues the other from its checkpoint, under the same id and seed."""
    config = _write_config(head, synthetic_root, f"finalists-{attempt}", num_samples=2, max_concurrent_trials=1,
                           scheduler="fifo", finalists={"k": 2, "repeats": 1})
    first = subprocess.Popen(_cli("run", "--config", str(config)), env=head["env"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def one_repeat_done_one_mid_training():
        repeats = [t for t in _trials(config).values() if t.finalist_of is not None]
        done = [t for t in repeats if t.status in TERMINAL]
        mid = [t for t in repeats if t.status == RUNNING and 1 <= _checkpointed_epoch(t) < 3]
        return (done, mid) if done and mid else None

    done, mid = _wait_until(one_repeat_done_one_mid_training, 600, "a finished and a checkpointed repeat", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2)  # Ray stops the dead driver's trials; let their last writes land
    second = subprocess.run(_cli("run", "--config", str(config)), env=head["env"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "finalists: " not in second.stdout  # chosen once, by the first driver

    trials = _trials(config)
    assert len(trials) == 4 and all(t.status == COMPLETED for t in trials.values()), [
        (t.trial_id, t.status, t.reason) for t in trials.values()]
    (finished,), (continued,) = done, mid
    assert trials[finished.trial_id].epochs == finished.epochs and trials[finished.trial_id].attempts == 1
    again = trials[continued.trial_id]
    assert again.attempts == 2 and again.finalist_of == continued.finalist_of
    assert again.config.optim.seed == continued.config.optim.seed == 1
    assert max(e.get("resumed_from_epoch") or 0 for e in again.epochs) >= 1
    assert [e["epoch"] for e in again.epochs] == [1, 2, 3, 4]


def test_crashed_trial_retries_from_its_last_checkpoint(head, synthetic_root):
    config = _write_config(head, synthetic_root, "retry", num_samples=1, max_failures=1, scheduler="fifo")
    proc = subprocess.Popen(_cli("run", "--config", str(config)), env=head["env"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Tune registers a function trainable's checkpoint only when a separate `save` call
    # on its actor returns, after the epoch's result (and its record) arrived; it starts
    # the next epoch only after that. So once epoch 2 is recorded, epoch 1's checkpoint
    # is registered for certain; killing after epoch 1 alone raced that save (it failed
    # 1 CI run in about 8: the retry found no checkpoint and started over).
    def trial_after_epoch_two():
        trials = list(_trials(config).values())
        return trials[0] if trials and len(trials[0].epochs) >= 2 else None

    trial = _wait_until(trial_after_epoch_two, 600, "the trial's second epoch", proc)
    os.kill(trial.epochs[-1]["pid"], signal.SIGKILL)  # the trial's process dies, as on a lost node or OOM kill
    killed_at = time.time()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    (final,) = _trials(config).values()
    assert final.status == COMPLETED, final.reason
    assert final.attempts == 2 and len(final.failures) == 1
    resumed_from = max(e.get("resumed_from_epoch") or 0 for e in final.epochs)
    assert resumed_from >= 1
    assert [e["epoch"] for e in final.epochs] == [1, 2, 3, 4]
    # Epochs up to the checkpoint come from the first attempt, the rest from the retry.
    assert all(e["timestamp"] < killed_at for e in final.epochs[:resumed_from])
    assert all(e["timestamp"] > killed_at for e in final.epochs[resumed_from:])
    assert "retry 1/1 continues from its last checkpoint" in out


def test_retries_exhausted_records_the_trial_failed_with_its_reason(head, synthetic_root):
    config = _write_config(head, synthetic_root, "fails", num_samples=1, max_failures=1, scheduler="fifo")
    # An unexpected error on every attempt (a test fault): retried as a crash, then failed.
    env = {**head["env"], **job_config_env(crash={})}
    done = subprocess.run(_cli("run", "--config", str(config)), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (trial,) = _trials(config).values()
    assert trial.status == FAILED and trial.attempts == 2
    assert trial.reason == "RuntimeError: test fault: an unexpected crash"
    assert trial.failures == ("RuntimeError: test fault: an unexpected crash",)
