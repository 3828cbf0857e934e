"""Multi-node trials on a real 2-node Ray cluster on this machine (ray.cluster_utils).

Each node has one CPU, so a 2-worker trial must put one DDP rank (gloo) on each node.
"""

import json

import pytest

from search.config import parse_config
from search.train_job import train
from tests.conftest import small_run_config


@pytest.fixture(scope="module")
def two_nodes():
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


def test_shared_storage_check_names_what_to_configure(tmp_path):
    """The refusal itself, on a cluster where one node cannot read output_dir: the
    message must name the node count and the fix (this host has one filesystem, so the
    blind node is simulated by probing a path that only exists on the driver side)."""
    from search.storage import refusal_message

    message = refusal_message(tmp_path / "runs", blind=["10.0.0.7 (ab12cd34)"], num_nodes=3)
    assert "1 of 3 nodes" in message and "10.0.0.7" in message
    assert "same path on every node" in message and "output_dir" in message
