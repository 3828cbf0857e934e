"""The Ray that `tunecv run` starts on a workstation is private: every socket its
processes listen on (GCS, raylet, object manager, driver, workers, dashboard, agents,
metrics) is bound to the loopback address."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import small_run_config

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.", "::1", "::ffff:127.")


def _listeners(root) -> set[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket and bound UDP socket of
    ``root`` and its descendants (Ray's processes are the driver's children)."""
    import psutil

    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            name = proc.name()  # gcs_server, raylet, ray::IDLE, ray::ImplicitFunc, python
            for conn in proc.net_connections(kind="inet"):
                listening = conn.status == psutil.CONN_LISTEN or (conn.type == 2 and not conn.raddr)
                if listening:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # exited between the listing and the look
    return found


@pytest.mark.slow
def test_a_local_search_listens_on_loopback_only(synthetic_root, tmp_path):
    import psutil

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "needs_pretrained": False, "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
        "lr_head": {"low": 1.0e-3, "high": 1.0e-2}, "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
        "losses": {"ce": {}}}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_run_config(
        synthetic_root, tmp_path / "runs", optim={"epochs": 3},
        search={"space": str(space), "num_samples": 2, "export": False})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--config", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, int, str]] = set()
    try:
        while proc.poll() is None:
            seen |= _listeners(root)
            time.sleep(0.3)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    names = " ".join(name for _, _, name in seen)
    # The sampler saw Ray's own processes and a trial's, not only the driver.
    assert "gcs_server" in names and "raylet" in names and "ray::" in names, sorted(seen)
    assert "epoch 3/3" in out
    exposed = sorted(s for s in seen if not s[0].startswith(LOOPBACK))
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_a_trial_larger_than_any_node_is_refused_before_any_trial(synthetic_root, tmp_path):
    """Ray waits forever for a node that can hold a request no node has ("No available
    node types can fulfill ..."): the driver checks one trial against the nodes it has,
    and says which field asks for how much, before the scan, a run directory or a trial."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_run_config(synthetic_root, tmp_path / "runs", search={"export": False})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own: this machine's CPUs
    done = subprocess.run([sys.executable, "-m", "search.cli", "run", "--config", str(config), "--set",
                           "search.cpus_per_trial=64"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    cpus = os.cpu_count()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"tunecv: error: search.cpus_per_trial: a trial asks for 64 CPUs, but the largest node of this Ray cluster "
        f"has {cpus}; Ray would wait for such a node forever. Set search.cpus_per_trial to at most {cpus}, or add "
        "a node that large.")
    runs = tmp_path / "runs"
    assert not runs.exists() or not list(runs.iterdir())  # no scan, no run directory
