"""A search whose run directory lives in an object store (S3 protocol, local endpoint).

Trials work in node-local copies and upload what they change; the report and the
export are rebuilt from the bucket alone.
"""

import json
import os
import shutil
import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from search.config import parse_config
from tests.conftest import small_run_config
from tests.test_cluster import SPACE

pytestmark = pytest.mark.slow


def _bucket_files(uri: str) -> set[str]:
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return {i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_search_keeps_its_whole_run_in_the_bucket(s3_bucket, synthetic_root, tmp_path):
    import ray

    from search.driver import run_search

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = parse_config(small_run_config(
        synthetic_root, f"{s3_bucket}/runs", name="s3run",
        search={"space": str(tmp_path / "space.yaml"), "num_samples": 2, "max_concurrent_trials": 2,
                "asha": {"grace_period": 1}},
    ))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        work_copy = run_search(cfg, print_fn=lambda *_: None)
    finally:
        ray.shutdown()

    (run_name,) = {f.split("/")[0] for f in _bucket_files(f"{s3_bucket}/runs")}
    run_uri = f"{s3_bucket}/runs/{run_name}"
    files = _bucket_files(run_uri)
    for name in ("config.yaml", "split.parquet", "split.json", "space.yaml", "optuna.journal",
                 "search_state.json", "report.parquet", "report.md", "export/model.onnx", "export/metrics.json"):
        assert name in files, name
    trial_ids = {f.split("/")[1] for f in files if f.startswith("trials/")}
    assert len(trial_ids) == 2
    for trial_id in trial_ids:
        for name in ("trial.json", "metrics.jsonl", "best/model.safetensors", "last/train_state/state.json"):
            assert f"trials/{trial_id}/{name}" in files, (trial_id, name)

    # `tunecv report` from the bucket alone, with this machine's working copy gone.
    shutil.rmtree(work_copy)
    tmp = tmp_path / "tmp"  # where the command's private view of the bucket goes
    tmp.mkdir()
    done = subprocess.run([sys.executable, "-m", "search.cli", "report", run_uri],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(t in done.stdout for t in trial_ids)
    assert list(tmp.iterdir()) == []  # the view is deleted after use
    fs, base = pafs.FileSystem.from_uri(run_uri)
    with fs.open_input_file(f"{base}/report.parquet") as f:
        table = pq.read_table(f).to_pylist()
    assert {r["trial_id"] for r in table} == trial_ids and table[0]["macro_f1"] > 0.3
    with fs.open_input_stream(f"{base}/search_state.json") as f:
        assert json.loads(f.readall())["status"] == "finished"
