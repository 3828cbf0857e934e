"""A search whose run lives in an object store (S3 protocol, moto's server on loopback)
or on a filesystem: Ray writes the checkpoints there, the driver writes the study and
its own files whole, and everything a user reads (the report, the export) comes from
the run location alone, during the search as well as after it.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from search.config import parse_config
from search.drivers import read_drivers
from search.storage import RunStore
from tests.conftest import small_run_config
from tests.test_cluster import SPACE

pytestmark = pytest.mark.slow


def _bucket_files(uri: str) -> set[str]:
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File}


class _ReportPoller(threading.Thread):
    """Runs ``tunecv report RUN`` every 0.5 s until stopped; keeps every outcome."""

    def __init__(self, run_uri: str) -> None:
        super().__init__(daemon=True)
        self.run_uri = run_uri
        self.outcomes: list[object] = []  # exit codes, or the exception a call raised
        self.stop = threading.Event()

    def run(self) -> None:
        from search.cli import main

        while not self.stop.is_set():
            try:
                self.outcomes.append(main(["report", self.run_uri]))
            except BaseException as err:  # noqa: BLE001 - any escape is a failed call
                self.outcomes.append(err)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_2cpu(s3_bucket):
    """One local Ray for this module's searches (a start and a stop cost ~10 s here),
    started after ``s3_bucket`` has set the AWS variables its workers inherit."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("storage", ["s3", "local"])
def test_search_keeps_its_whole_run_in_storage_and_reports_from_it_throughout(
    ray_2cpu, s3_bucket, synthetic_root, tmp_path, capsys, storage
):
    from search.run.driver import run_search

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    output_dir = f"{s3_bucket}/runs" if storage == "s3" else str(tmp_path / "runs")
    cfg = parse_config(small_run_config(
        synthetic_root, output_dir, name="polled",
        search={"space": str(tmp_path / "space.yaml"), "num_samples": 3, "max_concurrent_trials": 2,
                "asha": {"grace_period": 1}},
    ))
    run_uri = f"{output_dir}/polled-run"
    poller = _ReportPoller(run_uri)
    try:
        poller.start()
        run_search(cfg, print_fn=lambda *_: None, run_dir=run_uri)
    finally:
        poller.stop.set()
        poller.join(timeout=120)
    capsys.readouterr()  # the poller's tables

    # Before the driver wrote config.yaml the run did not exist yet (exit code 2, "not a
    # run"); from the first report on, every call during the search succeeded.
    answered = poller.outcomes[next(i for i, o in enumerate(poller.outcomes) if o == 0):]
    assert len(answered) >= 10, poller.outcomes
    assert all(o == 0 for o in answered), [o for o in answered if o != 0]

    files = _bucket_files(run_uri)
    # In a bucket the study is append-only segments (search/study.py:StoreJournal), never one
    # rewritten object; on a filesystem Optuna's own journal file, appended to.
    segments = any(f.startswith("optuna.journal.d/") for f in files)
    assert (segments, "optuna.journal" in files) == ((True, False) if storage == "s3" else (False, True))
    for name in ("config.yaml", "split.parquet", "split.json", "space.yaml",
                 "drivers/001.json", "drivers/001/end.json", "report.parquet", "report.md", "report.html",
                 "export/model.onnx", "export/metrics.json"):
        assert name in files, name
    trial_dirs = {"/".join(f.split("/")[:3]) for f in files if f.startswith("tune/001/t0")}
    assert len(trial_dirs) == 3
    for trial_dir in trial_dirs:  # Ray's checkpoints: weights, meta, per-class metrics, resumable state
        for name in ("model.safetensors", "meta.json", "metrics.json", "train_state/state.json"):
            assert any(f.startswith(f"{trial_dir}/checkpoint_") and f.endswith(name) for f in files), (trial_dir, name)

    # `tunecv report` from the bucket alone, in a fresh process: nothing left in its TMPDIR.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = subprocess.run([sys.executable, "-m", "search.cli", "report", run_uri], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp.iterdir()) == []
    fs, base = pafs.FileSystem.from_uri(run_uri)
    with fs.open_input_file(f"{base}/report.parquet") as f:
        table = pq.read_table(f).to_pylist()
    assert all(r["trial_id"] in done.stdout for r in table) and len(table) == 3
    assert table[0]["macro_f1"] > 0.3
    assert read_drivers(RunStore.at(run_uri))[-1].status == "finished"

    # `tunecv export` of another trial: it downloads that checkpoint only, and leaves no copy behind.
    other = table[1]["trial_id"]
    done = subprocess.run([sys.executable, "-m", "search.cli", "export", run_uri, "--trial", other,
                           "--out", str(tmp_path / "exported")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "exported" / "model.onnx").is_file() and list(tmp.iterdir()) == []
    assert json.loads((tmp_path / "exported" / "metrics.json").read_text())["macro_f1"] == pytest.approx(
        table[1]["macro_f1"])


def test_a_search_reads_its_images_from_the_bucket(ray_2cpu, s3_bucket, synthetic_root, tmp_path):
    """data.root is an s3:// prefix and no local copy exists: the driver lists the bucket,
    Ray tasks scan it, and every trial (and the export's check) reads its images from it."""
    import shutil

    from search.run.driver import run_search
    from trainables.data.split_files import read_split

    local = tmp_path / "images"
    shutil.copytree(synthetic_root, local)
    data_uri = f"{s3_bucket}/datasets/synthetic"
    fs, base = pafs.FileSystem.from_uri(data_uri)
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    shutil.rmtree(local)  # the bucket is the only copy

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = parse_config(small_run_config(
        data_uri, tmp_path / "runs", name="bucket-data", optim={"epochs": 1},
        search={"space": str(tmp_path / "space.yaml"), "num_samples": 2, "max_concurrent_trials": 2,
                "scheduler": "fifo"},
    ))
    lines: list[str] = []
    store = run_search(cfg, print_fn=lambda line="", *_: lines.append(str(line)))
    assert any("reading 160 on Ray" in line for line in lines), lines[:20]
    split = read_split(store.uri("split.parquet"))
    assert split.root == data_uri and len(split.train) + len(split.val) == 160
    report = pq.read_table(store.uri("report.parquet")).to_pylist()
    assert len(report) == 2 and max(r["macro_f1"] for r in report) > 0.4  # 4 classes: chance is 0.25
    metrics = json.loads(store.read_text("export/metrics.json"))
    assert metrics["macro_f1"] == pytest.approx(report[0]["macro_f1"])


def test_tunes_result_grid_reads_nothing_per_trial_from_the_run_storage(tmp_path):
    """``Tuner.fit`` ends by building a result grid that looks for each trial's
    ``result.json`` and ``progress.csv``, files tunecv turns off: on S3, 4 requests a
    trial (95 s for 1,000 trials on moto's). With tunecv's Ray session set up, building
    it for 50 trials asks the run's storage nothing about them."""
    from types import SimpleNamespace

    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.tune.analysis.experiment_analysis import ExperimentAnalysis

    from search.ray_session import _no_result_grid_reads

    asked: list[str] = []

    class Recording(FSSpecHandler):
        def get_file_info(self, paths):
            asked.extend(paths)
            return super().get_file_info(paths)

        def open_input_stream(self, path):
            asked.append(path)
            return super().open_input_stream(path)

    fs = PyFileSystem(Recording(LocalFileSystem()))
    (tmp_path / "experiment_state-1.json").write_text("{}")
    trials = [SimpleNamespace(trial_id=f"t{n:04d}", config={}, last_result={"macro_f1": 0.5},
                              storage=SimpleNamespace(trial_fs_path=str(tmp_path / f"t{n:04d}"), storage_filesystem=fs))
              for n in range(50)]

    _no_result_grid_reads()  # as connect_ray does (and may have done in this process)
    analysis = ExperimentAnalysis(str(tmp_path / "experiment_state-1.json"), trials=trials, storage_filesystem=fs)
    assert asked == []
    # What it no longer does for each trial: Ray's own per-trial fetch looks for both files.
    with pytest.raises(FileNotFoundError):
        analysis._fetch_trial_dataframe(trials[0])
    assert [p.rsplit("/", 1)[-1] for p in asked] == ["result.json", "progress.csv"]
