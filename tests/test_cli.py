"""The tunecv command line: its commands through ``main()`` in this process (conftest's
``tunecv_here``), and one training run and one killed search as a user starts them."""

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.scan_cache import CACHE_DIR
from tests.conftest import small_run_config


def _tunecv(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_train_prints_epochs_and_per_class_report(synthetic_root, tmp_path):
    # A class folder whose name would retitle the terminal and clear it, printed raw.
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    hostile = "class_3\x1b]0;owned\x07\x1b[2J"
    (data / "class_3").rename(data / hostile)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(data, tmp_path / "runs")))
    proc = _tunecv("train", "--config", str(path), "--set", "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "epoch   1" in proc.stdout
    for k in range(3):
        assert f"class_{k}" in proc.stdout
    assert "class_3\\x1b]0;owned\\x07\\x1b[2J" in proc.stdout  # shown, escaped
    assert "\x1b]" not in proc.stdout + proc.stderr and "\x1b[2J" not in proc.stdout + proc.stderr
    assert "macro-F1" in proc.stdout
    run_dirs = [d for d in (tmp_path / "runs").iterdir() if d.name != CACHE_DIR]
    assert len(run_dirs) == 1
    assert list((tmp_path / "runs" / CACHE_DIR).rglob("*.parquet"))  # the scan, for the next run of this data
    for name in ("config.yaml", "split.parquet", "split.json", "metrics.jsonl", "best", "last"):
        assert (run_dirs[0] / name).exists(), name


def test_bad_config_fails_fast_with_exit_2_and_no_traceback(tmp_path, tunecv_here):
    path = tmp_path / "run.yaml"
    raw = small_run_config(tmp_path, tmp_path / "runs", optim={"epochz": 3})
    path.write_text(yaml.safe_dump(raw))
    proc = tunecv_here("train", "--config", str(path))
    assert proc.returncode == 2
    assert "optim.epochz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing created before validation passed


def test_corrupt_images_are_listed_and_skipped(synthetic_root, tmp_path, tunecv_here):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "class_1" / "empty.png").write_bytes(b"")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(root, tmp_path / "runs")))
    proc = tunecv_here("train", "--config", str(path), "--set", "optim.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 bad file(s)" in proc.stdout
    assert "class_0/broken.png" in proc.stdout and "class_1/empty.png" in proc.stdout
    strict = tunecv_here("train", "--config", str(path), "--set", "data.strict=true")
    assert strict.returncode == 2
    assert "broken.png" in strict.stderr and "empty.png" in strict.stderr


def test_data_digits_writes_the_bundled_set(tmp_path, tunecv_here):
    proc = tunecv_here("data", "digits", str(tmp_path / "digits"), "--image-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "1797 digit images in 10 classes" in proc.stdout
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797


def test_data_commands_never_overwrite_or_traceback_on_bad_arguments(tmp_path, tunecv_here):
    out = tmp_path / "synth"
    assert tunecv_here("data", "synthetic", str(out), "--image-size", "16").returncode == 0
    first = (out / "class_0" / "0000.png").read_bytes()
    again = tunecv_here("data", "synthetic", str(out), "--image-size", "16", "--seed", "1")
    assert again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr
    assert (out / "class_0" / "0000.png").read_bytes() == first  # nothing of the user's replaced
    forced = tunecv_here("data", "synthetic", str(out), "--image-size", "16", "--seed", "1", "--overwrite")
    assert forced.returncode == 0 and (out / "class_0" / "0000.png").read_bytes() != first
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, message in (
        (["synthetic", str(tmp_path / "n"), "--num-classes", "0"], "num_classes must be an integer of at least 2"),
        (["synthetic", str(tmp_path / "s"), "--image-size", "-5"], "image_size must be an integer of at least 8"),
        (["digits", str(a_file)], "is a file"),
    ):
        proc = tunecv_here("data", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_run_with_bad_data_fails_before_ray_and_leaves_no_run_directory(tmp_path, tunecv_here):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(empty, tmp_path / "runs")))
    proc = tunecv_here("run", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "have no valid training image;" in proc.stderr  # none skipped
    assert "Ray" not in proc.stdout + proc.stderr  # no "Started a local Ray instance"
    assert not (tmp_path / "runs").exists()  # the listing showed it: not even a scan


def test_a_symlink_looping_back_into_the_data_root_is_one_line_before_any_work(synthetic_root, tmp_path, tunecv_here):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "class_0" / "loop").symlink_to("..")  # would label the other classes' images class_0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(root, tmp_path / "runs")))
    proc = tunecv_here("train", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "tunecv: error: symlink 'class_0/loop' -> '..' points back to the data root itself, which contains "
        "the link: the scan would walk into it again and count images twice or under the wrong class. Remove "
        "the link, or point it at a folder inside the root that does not contain it."]
    assert "Ray" not in proc.stdout  # refused while listing, before Ray, the scan or a run directory
    assert not (tmp_path / "runs").exists()


def _space_file(tmp_path, **extra):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "needs_pretrained": False, "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
        "lr_head": {"low": 1.0e-3, "high": 1.0e-2}, "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
        "losses": {"ce": {}}, **extra}))
    return path


def _refused_before_ray(proc, tmp_path, *phrases):
    import ray

    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out and "Ray" not in out, out[-2000:]
    assert not ray.is_initialized()
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    runs = tmp_path / "runs"
    # No run directory for a refused start; the scan cache may be there (the corrected
    # command reuses the scan).
    assert not runs.exists() or [p.name for p in runs.iterdir()] == [CACHE_DIR]


def test_a_batch_larger_than_the_training_set_is_refused_before_ray_and_before_a_run_directory(
        synthetic_root, tmp_path, tunecv_here):
    path = tmp_path / "run.yaml"
    # 160 images, 20% held out for validation by hash: 130 train.
    path.write_text(yaml.safe_dump(small_run_config(synthetic_root, tmp_path / "runs")))
    proc = tunecv_here("train", "--config", str(path), "--set", "optim.batch_size=500")
    _refused_before_ray(proc, tmp_path, "optim.batch_size 500 is larger than the 130 training images; "
                                        "set optim.batch_size to at most 130.")
    plain = _space_file(tmp_path)
    proc = tunecv_here("run", "--config", str(path), "--set", "optim.batch_size=500", "--space", str(plain))
    _refused_before_ray(proc, tmp_path, "optim.batch_size 500 is larger than the 130 training images")
    proc = tunecv_here("run", "--config", str(path), "--set", "optim.batch_size=100", "--set",
                   "scaling.num_workers=2", "--space", str(plain))
    _refused_before_ray(proc, tmp_path, "(65 for each of 2 workers)", "at most 65")
    searched = _space_file(tmp_path, batch_size=[16, 200, 500])
    proc = tunecv_here("run", "--config", str(path), "--space", str(searched))
    _refused_before_ray(proc, tmp_path, "searches batch_size [16, 200, 500], and [200, 500] are larger than the "
                                        "130 training images")


def test_resume_of_a_train_directory_is_refused_before_ray(synthetic_root, tmp_path, tunecv_here):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(small_run_config(synthetic_root, tmp_path / "trained")))
    assert tunecv_here("train", "--config", str(path), "--set", "optim.epochs=1").returncode == 0
    (train_dir,) = [d for d in (tmp_path / "trained").iterdir() if d.name != CACHE_DIR]
    proc = tunecv_here("run", "--resume", str(train_dir))
    _refused_before_ray(proc, tmp_path, f"'{train_dir}' is not a search run", "tunecv run --config")
    proc = tunecv_here("report", str(train_dir))
    assert proc.returncode == 2 and f"'{train_dir}' is not a search run" in proc.stderr, proc.stderr


def test_report_on_a_run_that_stopped_in_its_set_up_says_so(synthetic_root, tmp_path, tunecv_here):
    from search.config import dump_config, parse_config
    from search.drivers import INTERRUPTED, DriverRecord
    from search.layout import CONFIG
    from search.storage import RunStore

    store = RunStore.at(tmp_path / "runs" / "t-1")
    store.write_text(CONFIG, dump_config(parse_config(small_run_config(synthetic_root, tmp_path / "runs"))))
    DriverRecord(store, 1).finish(INTERRUPTED)  # it stopped before writing space.yaml
    proc = tunecv_here("report", store.location)
    assert proc.returncode == 2 and "never started searching" in proc.stderr, proc.stdout + proc.stderr


def _run_file(tmp_path, **sections):
    """A run file whose data root exists (empty: these refusals come before the data is listed)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(tmp_path / "data", tmp_path / "runs", **sections)))
    return path


def test_a_set_value_that_is_not_yaml_is_one_line_naming_it(tmp_path, tunecv_here):
    proc = tunecv_here("run", "--config", str(_run_file(tmp_path)), "--set", "optim.epochs=[1,2")
    _refused_before_ray(proc, tmp_path)
    assert proc.stderr.splitlines() == [
        "tunecv: error: --set optim.epochs: the value '[1,2' is not valid YAML (while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>'); give a complete YAML value (3, [1, 2], {a: 1}), or quote "
        "it to pass a string: --set \"optim.epochs='[1,2'\""]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc: os.access calls it writable "
                                                           "(for root), and it refuses every new file")
def test_an_output_dir_where_no_file_can_be_made_is_one_line_before_ray(tmp_path, tunecv_here):
    from search.config import ConfigError, parse_config

    raw = yaml.safe_load(_run_file(tmp_path).read_text())
    with pytest.raises(ConfigError, match="cannot be created or written"):  # first here, where no Ray can start
        parse_config({**raw, "output_dir": "/proc/tunecv-runs"})
    proc = tunecv_here("run", "--config", str(tmp_path / "run.yaml"), "--set", "output_dir=/proc/tunecv-runs")
    _refused_before_ray(proc, tmp_path)
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tunecv: error: invalid config '{tmp_path / 'run.yaml'}': output_dir: '/proc/tunecv-runs' "
                           "cannot be created or written (a test file in '/proc' failed: "), line
    assert line.endswith("); give a directory you can write to"), line
    assert not Path("/proc/tunecv-runs").exists()


def test_report_on_a_folder_that_is_not_a_run_names_what_it_expected(tmp_path, tunecv_here):
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
    proc = tunecv_here("report", str(data))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"tunecv: error: '{data}' is not a tunecv run directory: expected one holding config.yaml and space.yaml, as "
        "`tunecv run` makes under output_dir, but found 2 entries: cat, dog. Give a run directory "
        "(output_dir/<name>-<start time>)."]
    assert sorted(p.name for p in data.rglob("*")) == ["cat", "dog"]  # nothing written


def test_resume_of_a_hand_edited_config_is_refused_before_ray(tmp_path, tunecv_here):
    from search.config import ConfigError, load_config
    from search.drivers import INTERRUPTED, DriverRecord
    from search.layout import CONFIG, SPACE
    from search.run.location import check_resumable
    from search.storage import RunStore, config_digest, read_config, write_config

    store = RunStore.at(tmp_path / "old" / "t-20261101-000000")  # outside output_dir: that must stay empty
    write_config(store, load_config(_run_file(tmp_path)))  # as the driver does at a run's start
    store.write_text(SPACE, "backbones: {}\n")
    DriverRecord(store, 1).finish(INTERRUPTED)
    started = store.read_text(CONFIG)
    store.write_text(CONFIG, started.replace("epochs: 2\n", "epochs: 3\n"))
    with pytest.raises(ConfigError, match="was edited after the run started"):  # first here, where no Ray can start
        check_resumable(store, read_config(store))
    before = {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()}
    proc = tunecv_here("run", "--resume", store.location)
    _refused_before_ray(proc, tmp_path)
    edited = config_digest(store.read_text(CONFIG))[:12]
    assert proc.stderr.splitlines() == [
        f"tunecv: error: run '{store}': {store.uri(CONFIG)} was edited after the run started (sha256 {edited}..., but "
        f"config.sha256 recorded {config_digest(started)[:12]}... at its start), so its trials did not run with these "
        f"values. Restore the file as it was, or start a new run with the edited settings (`tunecv run --config "
        f"{store.uri(CONFIG)} --set name=NEW_NAME`)."]
    assert {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file()} == before


def test_a_warning_is_one_tunecv_line_without_python_s_source_line():
    script = ("import warnings, sys\nfrom search import cli\nwarnings.showwarning = cli._warning_line\n"
              "warnings.warn('3 held-out image(s) have byte-identical copies', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stderr == "tunecv: warning: 3 held-out image(s) have byte-identical copies\n"


def test_the_console_keeps_colour_and_line_breaks_and_shows_every_other_control_escaped():
    from search.console import console_text

    # Ray's log prefixes are coloured (SGR): kept. A title (OSC), a one-byte CSI, a bell: shown.
    assert (console_text("\x1b[2m\x1b[36m(pid=1)\x1b[0m a\x1b]0;t\x07\x9b2J\tb\r\n")
            == "\x1b[2m\x1b[36m(pid=1)\x1b[0m a\\x1b]0;t\\x07\\x9b2J\tb\r\n")
    assert console_text("class_0: 9 train") == "class_0: 9 train"
    # An unexpected error's traceback, printed once the command has ended, too.
    script = ("import sys\nfrom search.console import escaped_excepthook\nsys.excepthook = escaped_excepthook\n"
              "raise ValueError('class_\\x1b]0;owned\\x07')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "ValueError: class_\\x1b]0;owned\\x07" in proc.stderr and "\x1b" not in proc.stderr


def test_a_registry_that_cannot_be_used_is_one_line_naming_it_before_any_work(synthetic_root, tmp_path, capsys,
                                                                               monkeypatch):
    import http.server
    import socket
    import threading
    import time

    from search.cli import main

    class NotMlflow(http.server.BaseHTTPRequestHandler):  # a web server at the wrong address: 404s
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    uris = {f"http://127.0.0.1:{_closed_port()}": "Connection refused",
            f"http://127.0.0.1:{server.server_port}/wrong": "404 != 200", "foo://registry": "unsupported URI",
            # MLflow's own retries waited 256 s on a server that does not answer.
            f"http://127.0.0.1:{silent.getsockname()[1]}": "Read timed out"}
    path = tmp_path / "run.yaml"
    out = tmp_path / "runs"
    path.write_text(yaml.safe_dump(small_run_config(synthetic_root, out, retrain={
        "model_name": "m", "snapshot": str(synthetic_root), "num_samples": 1})))
    try:
        for uri, why in uris.items():
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            start = time.monotonic()
            assert main(["retrain", "--config", str(path)]) == 2
            assert time.monotonic() - start < 10  # the probe waits at most 8 s
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"tunecv: error: cannot use the MLflow registry at {uri} ")
            assert why in lines[0] and "nothing was trained" in lines[0], lines[0]
            assert [p.name for p in out.iterdir()] == [".retrain-m.lock"]  # no run, no database
    finally:
        server.shutdown()
        silent.close()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_process_of_its_local_ray_behind(synthetic_root, tmp_path):
    """Ray's two agents outlived a SIGKILLed driver by more than 60 s (they report the
    raylet's death to a GCS that died with it); the watcher (search/ray_reaper.py) ends them."""
    import os
    import signal
    import time

    import psutil

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_run_config(synthetic_root, tmp_path / "runs", optim={"epochs": 50},
                                                    search={"num_samples": 2, "max_concurrent_trials": 2})))
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "run", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)

    def training() -> bool:
        tree = driver.children(recursive=True)
        return any(p.name() == "raylet" for p in tree) and any(
            " ".join(p.cmdline()).startswith("ray::ImplicitFunc") for p in tree if p.is_running())

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if training():
                break
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the search never started a trial")
    ours = driver.children(recursive=True)  # Ray's processes, the trials, the watcher
    agents = [p for p in ours if p.name() == "raylet"][0].children()
    assert {" ".join(p.cmdline()).strip() for p in agents} >= {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.monotonic()

    def alive() -> list[str]:
        left = []
        for p in ours:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.name())
            except psutil.NoSuchProcess:
                pass
        return left

    while alive() and time.monotonic() - start < 20:
        time.sleep(0.2)
    gone_after = time.monotonic() - start
    left = alive()
    for p in ours:  # never leave them to the next test
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left and gone_after < 6, (left, gone_after)  # ~2.1 s here: the watcher's 2 s grace
