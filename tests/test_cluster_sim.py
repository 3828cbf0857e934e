"""``bench/cluster_sim.py``: what it derives from trial times and placements (no Ray), and
a smoke run of the real search on a simulated 2-node cluster.

Its own module, not ``test_bench.py``: the smoke run starts a ``ray.cluster_utils.Cluster``
of its own, which it cannot do while that module's shared local Ray is alive."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from bench._common import BenchError
from bench._s3_counter import Request
from bench.cluster_sim import SMOKE, DriverProbe, check, packing, s3_traffic


def _probe(intervals: dict[str, tuple[float, float]]) -> DriverProbe:
    probe = DriverProbe(SMOKE, trace=False)
    probe.start = {t: start for t, (start, _) in intervals.items()}
    probe.end = {t: end for t, (_, end) in intervals.items()}
    return probe


def test_packing_counts_the_gpus_held_at_the_peak_of_concurrent_trials():
    # a and b share GPU 0 of node n1; c runs alone on n2's GPU 3, overlapping a and b at 2 s;
    # d starts after a has ended.
    probe = _probe({"a": (0.0, 4.0), "b": (1.0, 5.0), "c": (2.0, 3.0), "d": (4.5, 6.0)})
    placed = {"a": {"node": "n1", "gpus": ["0"], "pid": 1}, "b": {"node": "n1", "gpus": ["0"], "pid": 2},
              "c": {"node": "n2", "gpus": ["3"], "pid": 3}, "d": {"node": "n1", "gpus": ["1"], "pid": 1}}
    result = packing(probe, placed, gpu_per_trial=0.5)
    assert result["peak_running"] == 3  # a, b and c at 2 s
    assert result["peak_gpus_requested"] == 1.5
    assert result["peak_gpus_holding"] == 2
    assert result["peak_trials_per_gpu"] == {1: 1, 2: 1}  # one GPU with 1 trial, one with 2
    assert result["peak_trials_per_node"] == {"n1": 2, "n2": 1}
    assert result["nodes_used"] == 2 and result["trial_processes"] == 3  # d reused a's process
    assert result["trials_per_node"] == [3, 1] and result["gpu_ids_used"] == ["0", "1", "3"]


def test_check_refuses_trials_without_a_placement_or_a_gpu():
    probe = _probe({f"t{i}": (0.0, 1.0) for i in range(SMOKE.trials)})
    views = [SimpleNamespace(epochs=[{"epoch": 1}]) for _ in range(SMOKE.trials)]
    placed = {t: {"node": "n1", "gpus": ["0"], "pid": 1} for t in probe.end}
    check(probe, placed, views, SMOKE)  # all there: no error
    with pytest.raises(BenchError, match="1 trial\\(s\\) never reported their placement"):
        check(probe, {t: p for t, p in placed.items() if t != "t0"}, views, SMOKE)
    with pytest.raises(BenchError, match="without a GPU id"):
        check(probe, {**placed, "t0": {"node": "n1", "gpus": [], "pid": 1}}, views, SMOKE)
    with pytest.raises(BenchError, match="12 trials asked for"):
        check(probe, placed, views[1:], SMOKE)


def test_s3_traffic_names_the_kinds_of_request_that_grew_per_trial():
    # 12 trials ending a second apart; windows of one trial: early (trial 2), late (trial 11).
    probe = _probe({f"t{i:04d}": (0.0, float(i)) for i in range(1, 13)})
    run = "/b/runs/sim-20261207-101010"

    def at(second: float, method: str, path: str, query: str = "") -> Request:
        return Request(second, method, path, 0, query)

    early = [at(2.5, "PUT", f"{run}/tune/001/t0002/checkpoint_000001/model.safetensors"),
             at(2.6, "GET", "/b/", "list-type=2&prefix=runs%2Fsim-20261207-101010%2Ftune%2F&delimiter=%2F")]
    late = [at(11.5, "PUT", f"{run}/tune/001/t0011/checkpoint_000001/model.safetensors")]
    late += [at(11.6, "GET", "/b/", "list-type=2&prefix=runs%2Fsim-20261207-101010%2Ftune%2F&delimiter=%2F")] * 3
    result = s3_traffic(early + late, probe, dataclasses.replace(SMOKE, rss_from_trial=2))
    assert result["per_trial_early"]["requests"] == 2 and result["per_trial_late"]["requests"] == 4
    kinds = result["changed_kinds"]
    assert list(kinds)[0] == "GET tune/ ?delimiter,list-type" and kinds["GET tune/ ?delimiter,list-type"] == [1, 3]
    assert kinds["PUT tune/#/t#/checkpoint_#/model.safetensors"] == [1, 1]
    assert result["top_kinds"] == {"GET tune/ ?delimiter,list-type": [1, 3],
                                   "PUT tune/#/t#/checkpoint_#/model.safetensors": [1, 1]}


@pytest.mark.slow
def test_cluster_sim_smoke_run_places_every_trial_on_a_logical_gpu(tmp_path):
    from bench.cluster_sim import TRIAL_RESOURCES, main

    result = json.loads(main(["--smoke", "--results", str(tmp_path)]).read_text())
    assert result["commit"] and result["measured_at"]
    assert sum(result["statuses"].values()) == SMOKE.trials
    assert set(result["statuses"]) <= {"completed", "stopped_early"}  # nothing failed
    assert result["cluster"]["nodes"] == SMOKE.nodes and result["max_concurrent_trials"] == SMOKE.concurrent

    speed = result["throughput"]
    assert speed["trials_per_min"] > 0 and 0 < speed["trial_wall_median_s"] < speed["search_s"]

    placed = result["packing"]
    assert 1 <= placed["peak_running"] <= SMOKE.concurrent
    assert placed["peak_gpus_requested"] == placed["peak_running"] * TRIAL_RESOURCES["gpu"]
    # Each GPU holds at most 1 / 0.5 = 2 trials, and there are 2 x 2 of them.
    assert placed["peak_gpus_requested"] <= placed["peak_gpus_holding"] <= min(placed["peak_running"], 4)
    assert sum(placed["peak_trials_per_node"].values()) == placed["peak_running"]
    assert 1 <= placed["nodes_used"] <= SMOKE.nodes and sum(placed["trials_per_node"]) == SMOKE.trials
    assert placed["gpu_ids_used"] and all(0 <= int(g) < SMOKE.gpus_per_node for g in placed["gpu_ids_used"])
    assert placed["trial_processes"] <= SMOKE.concurrent  # actors were reused

    memory = result["driver_memory"]
    assert {str(SMOKE.rss_from_trial), str(SMOKE.trials)} <= set(memory["rss_mb"])
    assert all(mb > 100 for mb in memory["rss_mb"].values())  # a driver with torch and Ray loaded
    last, low = memory["rss_mb"][str(SMOKE.trials)], memory["rss_mb"][str(memory["rss_low_trial"])]
    assert low == min(mb for n, mb in memory["rss_mb"].items() if int(n) >= SMOKE.rss_from_trial)
    assert memory["rss_growth_mb"] == pytest.approx(last - low, abs=0.11)
    assert memory["rss_growth_from_first_mb"] == pytest.approx(last - memory["rss_mb"][str(SMOKE.rss_from_trial)],
                                                               abs=0.11)
    assert result["write_run_report_s"] > 0 and result["wall_s"]["to_report_line"] > 0
    steps = [v for k, v in result["wall_s"].items() if k != "total"]
    assert all(v >= 0 for v in steps) and sum(steps) == pytest.approx(result["wall_s"]["total"], abs=0.5)
