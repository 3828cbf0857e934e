"""Shared fixtures: small real image folders and run configs for end-to-end tests."""

import os
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (`pytest -n 2 --dist loadfile`). Two local Rays sharing /tmp/ray
# (session files, the "latest cluster" address file) made a 2-worker TorchTrainer trial
# die (ray-notes.md); with a temp directory per worker, two of those trials ran at once
# and passed. Every process a worker's tests start inherits its TMPDIR, named for the
# pytest session too, so two sessions at once (a loop beside a suite) stay apart as well.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _session = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:8]
    _worker_tmp = Path("/tmp") / f"tunecv-{_session}-{os.environ['PYTEST_XDIST_WORKER']}"
    _worker_tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(_worker_tmp)
    tempfile.tempdir = None

from trainables.data.demo_data import write_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """4 classes x 40 images at 32 px: learnable in two epochs on two cores."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, num_classes=4, images_per_class=40, image_size=32, seed=0)
    return root


def at_once(n: int, fn) -> None:
    """Call ``fn`` in ``n`` threads released together by a barrier; return when all end."""
    import threading

    barrier = threading.Barrier(n)

    def released() -> None:
        barrier.wait()
        fn()

    threads = [threading.Thread(target=released) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.fixture
def tunecv_here(monkeypatch, capsys):
    """``tunecv ARGS`` run in this process: its exit code, stdout and stderr as a
    ``CompletedProcess``. A subprocess spends ~2 s importing torch and Ray before its first
    check; the refusals and the small commands tested here take less. ``RAY_ADDRESS`` points
    where nothing listens, so a check that let bad input through fails to join a cluster
    rather than start a Ray in the test process. The subprocess path itself stays tested
    (test_cli.py's training run, the cluster and fault tests)."""
    import subprocess
    import sys
    import warnings

    from search.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs its own hooks
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*args) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["tunecv", *argv], code, out, err)

    return run


def small_run_config(data_root: Path, output_dir: Path, **sections) -> dict:
    """A raw run config for a tiny, fast trial; ``sections`` override whole sections."""
    raw = {
        "name": "t",
        "output_dir": str(output_dir),
        # No test split by default: most tests check counts, loaders or plumbing that a
        # 160-image set shared three ways would only make slower to read; the tests of
        # the held-out split (test_holdout, the search fixture) ask for one.
        "data": {"root": str(data_root), "image_size": 32, "num_workers": 0, "test_fraction": 0.0},
        "model": {"backbone": "test_resnet", "pretrained": False},
        "optim": {
            "epochs": 2, "batch_size": 16, "lr_head": 3e-3, "lr_base": 3e-3, "warmup_epochs": 0.2,
        },
        "augment": {"strength": 0.3, "coarse_dropout_p": 0.0},
        # No finalists unless a test is about them: they re-run the top trials.
        "search": {"finalists": {"k": 0}},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server on loopback (tests/postgres.py) with an empty database.
    Skips where the OS has no server, unless TUNECV_REQUIRE_POSTGRES is set (CI)."""
    import os

    from tests.postgres import postgres_bin, postgres_server

    if postgres_bin() is None:
        if os.environ.get("TUNECV_REQUIRE_POSTGRES"):
            pytest.fail("no PostgreSQL server: `make test` installs it as root (apt-get install postgresql)")
        pytest.skip("no PostgreSQL server (apt-get install postgresql)")
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_bucket():
    """An S3 endpoint on loopback (moto's server: real HTTP, pyarrow's real S3 client).

    Sets the AWS_* variables in this process before any Ray starts, so Ray's workers
    inherit them; yields the ``s3://`` URI of an empty bucket.
    """
    import logging
    import os
    import urllib.request
    import uuid

    from moto.server import ThreadedMotoServer

    # moto's server logs every request through werkzeug at INFO: thousands of lines in
    # a failing test's output, none of them about the failure.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = f"tunecv-{uuid.uuid4().hex[:8]}"
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/{bucket}", method="PUT"))
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_collection_modifyitems(items):
    """Modules with the most end-to-end (``slow``) tests first, each module's tests kept
    together and in order: xdist workers (`pytest -n 2 --dist loadfile`) take whole
    modules (a module's Ray fixture starts once) in this order, and the long ones
    started first leave the short ones to fill the end instead of one worker finishing
    alone."""
    slow = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + (item.get_closest_marker("slow") is not None)
    first_seen = {name: i for i, name in enumerate(dict.fromkeys(item.module.__name__ for item in items))}
    items.sort(key=lambda item: (-slow[item.module.__name__], first_seen[item.module.__name__]))
