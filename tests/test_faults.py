"""The faults a cluster has, on a real multi-node Ray (``ray.cluster_utils.Cluster``):
a node lost under a 2-worker trial, one Ray Train worker SIGKILLed (as the OS's OOM
killer does), and a trial whose step hangs. The driver runs as its own process
(``python -m search.cli run``) joined through ``RAY_ADDRESS``, as under ``ray job
submit``; the test process only starts and removes nodes.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from search.results.trials import COMPLETED, FAILED, load_run
from search.scan_cache import CACHE_DIR
from search.storage import RunStore
from tests.conftest import small_run_config
from tests.fault_hooks import job_config_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SPACE = {
    "needs_pretrained": False,
    "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
    "lr_head": {"low": 1.0e-3, "high": 1.0e-2},
    "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
    "losses": {"ce": {}},
    # The first trial is this recipe; a hang fault matches its exact lr_head, which TPE's
    # sampled values never equal.
    "warm_start": [{"backbone": "test_resnet", "unfreeze_depth": "all", "lr_head": 3.0e-3, "lr_base_ratio": 1.0,
                    "loss": "ce"}],
}


@pytest.fixture
def cluster():
    """A head with one CPU (the driver's trials need 0.01 for a TorchTrainer trial); tests add nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _config(tmp_path, synthetic_root, **sections) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    search = {"space": str(space), "seed": 1, "export": False, "scheduler": "fifo", "max_concurrent_trials": 1,
              **sections.pop("search", {})}
    optim = {"epochs": 4, "warmup_epochs": 0.5, **sections.pop("optim", {})}
    raw = small_run_config(synthetic_root, tmp_path / "runs", optim=optim, search=search, **sections)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start_driver(cluster, config: Path, **faults) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": cluster.address, **(job_config_env(**faults) if faults else {})}
    return subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--config", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials(tmp_path) -> list:
    runs = tmp_path / "runs"
    found = [d for d in runs.iterdir() if (d / "space.yaml").is_file()] if runs.is_dir() else []
    return sorted(load_run(RunStore.at(found[0])).trials, key=lambda t: t.trial_id) if found else []


def _wait_for_epoch(tmp_path, index: int, epoch: int, proc, timeout: float = 300, after: float = 0.0):
    """Until trial ``index`` has ``epoch`` epochs, one of them ended after ``after``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        trials = _trials(tmp_path)
        epochs = trials[index].epochs if len(trials) > index else ()
        if len(epochs) >= epoch and any(e["timestamp"] > after for e in epochs):
            return trials[index]
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"trial {index} never reached epoch {epoch}")


def _train_workers() -> list:
    """This test's Ray Train workers: descendants of this process (its cluster's raylets
    start them), not those of a Ray another pytest worker runs on the same host."""
    import psutil

    mine = psutil.Process().children(recursive=True)
    return [p for p in mine if "ray::RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:  # gone since it was listed
        return []


def _node_of(cluster, pid: int):
    """The cluster node whose raylet started process ``pid``."""
    import psutil

    parent = psutil.Process(pid).ppid()
    for node in cluster.list_all_nodes():
        if parent in {p.process.pid for p in node.all_processes.get("raylet", [])}:
            return node
    raise AssertionError(f"no node's raylet is the parent of pid {pid}")


def test_a_lost_node_and_a_killed_worker_are_retried_from_checkpoint(cluster, synthetic_root, tmp_path):
    """One 2-worker trial takes both faults: it loses the node its workers run on, then,
    retried on the node left, one worker process to SIGKILL. Each time it continues from
    its last checkpoint, and it ends with every epoch trained once after its fault."""
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    epochs = 6  # the kill comes at epoch 3 or 4: the trial must still be training then
    config = _config(tmp_path, synthetic_root, scaling={"num_workers": 2, "cpus_per_worker": 1},
                     optim={"epochs": epochs}, search={"num_samples": 1, "max_failures": 2})
    proc = _start_driver(cluster, config)
    try:
        _wait_for_epoch(tmp_path, 0, 2, proc)
        workers = _train_workers()
        assert len(workers) == 2, [w.info["cmdline"] for w in workers]
        node = _node_of(cluster, workers[0].pid)
        assert node in nodes and _node_of(cluster, workers[1].pid) is node  # packed on one 2-CPU node
        cluster.remove_node(node)  # the raylet and every worker on it die
        lost_at = time.time()

        _wait_for_epoch(tmp_path, 0, 3, proc, after=lost_at)  # retried, and past its checkpoint
        workers = _train_workers()
        assert len(workers) == 2, [w.info["cmdline"] for w in workers]
        assert _node_of(cluster, workers[0].pid) is not node
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (trial,) = _trials(tmp_path)
    assert trial.status == COMPLETED, trial.reason
    assert trial.attempts == 3 and len(trial.failures) == 2, trial.failures
    assert [e["epoch"] for e in trial.epochs] == list(range(1, epochs + 1))
    # Each retry loaded a checkpoint rather than starting over, and trained on from it.
    resumed = sorted({e["resumed_from_epoch"] for e in trial.epochs if e.get("resumed_from_epoch")})
    assert len(resumed) == 2 and resumed[0] >= 1, [e.get("resumed_from_epoch") for e in trial.epochs]
    assert all(e["timestamp"] > lost_at for e in trial.epochs[resumed[0]:])
    assert all(e["timestamp"] > killed_at for e in trial.epochs[resumed[1]:])
    assert "retry 1/2 continues from its last checkpoint" in out
    assert "retry 2/2 continues from its last checkpoint" in out


def test_a_hung_trial_fails_at_its_timeout_and_frees_its_resources(cluster, synthetic_root, tmp_path):
    """The first trial blocks forever before its first epoch; with search.trial_timeout_s
    it fails once, not retried, and the trials after it get its CPU."""
    cluster.add_node(num_cpus=2)  # the only node a 2-CPU trial fits on
    cluster.wait_for_nodes()
    # The timeout must pass every trial that is not hung: in CI under `pytest -n 2` a trial
    # of 2 epochs, start included, once took 22.8 s. One epoch under 30 s leaves room for a
    # machine that slow; the hung trial waits it out, so more costs the suite as much.
    timeout_s = 30
    config = _config(tmp_path, synthetic_root, optim={"epochs": 1},
                     search={"num_samples": 3, "trial_timeout_s": timeout_s, "cpus_per_trial": 2})
    started = time.time()
    proc = _start_driver(cluster, config, hang={"optim.lr_head": 3.0e-3})
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    hung, *rest = _trials(tmp_path)
    assert hung.status == FAILED and hung.attempts == 1, (hung.reason, hung.failures)
    assert hung.reason == (f"TrialTimeoutError: ran past search.trial_timeout_s ({timeout_s} s); raise the limit "
                           "if the trial is slow rather than hung (not retried)")
    assert not hung.epochs
    # Each trial needs both CPUs: the others ran only once the hung one let go of them.
    assert len(rest) == 2 and all(t.status == COMPLETED for t in rest), [(t.status, t.reason) for t in rest]
    assert time.time() - started < 300
    assert "failed, not retried: TrialTimeoutError" in out


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs for the run directory (needs root, as in CI)."""
    mount = tmp_path / "runs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write zeros into ``directory`` until its filesystem has no space left."""
    filler = directory / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    return filler


def test_a_full_disk_stops_the_search_resumably_and_names_the_run(cluster, small_disk, synthetic_root, tmp_path):
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    config = _config(tmp_path, synthetic_root, search={"num_samples": 3})
    proc = _start_driver(cluster, config)
    try:
        _wait_for_epoch(tmp_path, 0, 2, proc)
        filler = _fill(small_disk)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = [d for d in small_disk.iterdir() if d.is_dir() and d.name != CACHE_DIR]
    assert proc.returncode == 1, out[-3000:]
    assert f"tunecv: error: no space left for run '{run_dir}'" in out and "No space left on device" in out
    # (Ray may log its own failed syncs with a traceback; tunecv's error is one line.)
    assert f"tunecv run --resume {run_dir}" in out, out[-3000:]
    before = _trials(tmp_path)  # the records are readable
    assert before and len(before[0].epochs) >= 2 and not any(t.status == FAILED for t in before)

    filler.unlink()
    resumed = subprocess.run([sys.executable, "-m", "search.cli", "run", "--resume", str(run_dir)],
                             env={**os.environ, "RAY_ADDRESS": cluster.address}, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _trials(tmp_path)
    assert len(after) == 3 and all(t.status == COMPLETED for t in after), [(t.status, t.reason) for t in after]
    assert [e["epoch"] for e in after[0].epochs] == [1, 2, 3, 4]
