"""Multi-node trials on a real 2-node Ray cluster on this machine (ray.cluster_utils).

Each node has one CPU, so a 2-worker trial must put one DDP rank (gloo) on each node.
"""

import json

import pytest

from search.config import parse_config
from search.train_job import train
from tests.conftest import small_run_config


@pytest.fixture(scope="module")
def two_nodes(s3_bucket):  # the S3 endpoint's variables must be set before the nodes start
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_worker_ddp_across_two_nodes_trains_and_evaluates_like_one_worker(two_nodes, synthetic_root, tmp_path):
    import ray

    from search.evaluate_job import evaluate_checkpoint
    from search.storage import check_shared_storage

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    check_shared_storage(tmp_path / "runs")  # one host, one filesystem: both nodes see it
    cfg = parse_config(small_run_config(
        synthetic_root, tmp_path / "runs", optim={"epochs": 3}, scaling={"num_workers": 2, "cpus_per_worker": 1},
    ))
    run_dir = train(cfg, print_fn=lambda *_: None)
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["metrics"]["macro_f1"] > 0.5  # it trained: chance is ~0.25 with 4 classes

    two = evaluate_checkpoint(run_dir / "best", run_dir / "split.parquet", num_workers=2)
    one = evaluate_checkpoint(run_dir / "best", run_dir / "split.parquet", num_workers=1)
    assert two["world_size"] == 2 and len(set(two["nodes"])) == 2  # one rank per node
    for key in ("macro_f1", "accuracy", "balanced_accuracy", "val_loss"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    # ...and both equal what the 2-rank training run reported for that checkpoint.
    assert two["macro_f1"] == pytest.approx(meta["metrics"]["macro_f1"], abs=1e-9)


@pytest.mark.slow
def test_multi_worker_trial_across_nodes_keeps_its_run_in_the_bucket(two_nodes, s3_bucket, synthetic_root, tmp_path):
    """Object-store run, 2 DDP workers on 2 nodes: rank 0 uploads the trial's epochs and
    checkpoints from whichever node it is on; the driver's report sees them."""
    import pyarrow.fs as pafs
    import yaml

    from search.driver import run_search
    from search.storage import check_shared_storage
    from tests.test_cluster import SPACE

    check_shared_storage(f"{s3_bucket}/multi")  # both nodes read the probe through S3
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = parse_config(small_run_config(
        synthetic_root, f"{s3_bucket}/multi", name="multi", optim={"epochs": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 0.9},
        search={"space": str(tmp_path / "space.yaml"), "num_samples": 1, "export": False, "scheduler": "fifo"},
    ))
    lines = []
    run_search(cfg, print_fn=lines.append)
    fs, base = pafs.FileSystem.from_uri(f"{s3_bucket}/multi")
    files = {i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File}
    run_name = next(f.split("/")[0] for f in files if f.endswith("report.parquet"))
    trial = next(f.split("/")[2] for f in files if "/trials/" in f)
    for name in ("trial.json", "metrics.jsonl", "best/model.safetensors", "last/train_state/state.json"):
        assert f"{run_name}/trials/{trial}/{name}" in files, name
    with fs.open_input_stream(f"{base}/{run_name}/trials/{trial}/trial.json") as f:
        assert json.loads(f.readall())["status"] == "completed"
    with fs.open_input_stream(f"{base}/{run_name}/trials/{trial}/metrics.jsonl") as f:
        assert [json.loads(l)["epoch"] for l in f.readall().decode().splitlines()] == [1, 2]


def test_shared_storage_check_names_what_to_configure(tmp_path):
    """The refusal itself, on a cluster where one node cannot read output_dir: the
    message must name the node count and the fix (this host has one filesystem, so the
    blind node is simulated by probing a path that only exists on the driver side)."""
    from search.storage import refusal_message

    message = refusal_message(tmp_path / "runs", blind=["10.0.0.7 (ab12cd34)"], num_nodes=3)
    assert "1 of 3 nodes" in message and "10.0.0.7" in message
    assert "same path on every node" in message and "output_dir" in message
