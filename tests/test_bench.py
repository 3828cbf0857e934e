"""Benchmarks check what they read: a smoke run of every script under bench/ (the
smallest sizes; the numbers are not judged, the fields and their sanity are), and the
refusal to write a result when what was measured does not add up.

The three that search share one local Ray: starting it is most of a smoke run."""

import json
import math
import re
from types import SimpleNamespace

import pytest

from bench._common import REPO, RESULTS, BenchError
from bench.search_overhead import TrialClock, measured_trials


def _stamped(path) -> dict:
    result = json.loads(path.read_text())
    assert result["commit"] and result["measured_at"], "every result names the commit it measured"
    return result


def test_every_committed_result_names_a_clean_commit_and_the_benchmarks_page_names_it_too():
    page = (REPO / "docs" / "benchmarks.md").read_text()
    results = sorted(RESULTS.glob("*.json"))
    assert len(results) >= 6
    for path in results:
        commit = json.loads(path.read_text()).get("commit", "")
        # A result measured on uncommitted code cannot be reproduced from the repository.
        assert re.fullmatch(r"[0-9a-f]{12}", commit), f"{path.name}: commit {commit!r}"
        assert f"`{path.name}`" in page and commit[:7] in page, f"docs/benchmarks.md's table lacks {path.name} at {commit[:7]}"


@pytest.fixture(scope="module")
def shared_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _clock(ids):
    clock = TrialClock()
    clock.start = {i: 10.0 for i in ids}
    clock.end = {i: 15.0 for i in ids}
    return clock


def _view(trial_id, epoch_times):
    return SimpleNamespace(trial_id=trial_id, epochs=[{"epoch_time_s": t} for t in epoch_times], wall_time_s=5.0)


def test_overhead_refuses_trials_it_cannot_match_or_that_computed_nothing():
    ok = measured_trials(_clock(["t0000"]), [_view("t0000", [2.0, 1.5])], asked=1)
    assert ok[0]["compute_s"] == 3.5 and ok[0]["overhead_s"] == pytest.approx(1.5)  # record: 5 s
    assert ok[0]["tune_overhead_s"] == pytest.approx(1.5)  # Tune: 10 s to 15 s
    # Tune's own ids instead of run-level ones: the bug that once reported compute 0.00 s.
    with pytest.raises(BenchError, match="trial abaff7bb: no record"):
        measured_trials(_clock(["abaff7bb"]), [_view("t0000", [2.0])], asked=1)
    with pytest.raises(BenchError, match="no epoch compute recorded"):
        measured_trials(_clock(["t0000"]), [_view("t0000", [])], asked=1)
    with pytest.raises(BenchError, match="2 trials asked for"):
        measured_trials(_clock(["t0000"]), [_view("t0000", [2.0])], asked=2)


@pytest.mark.slow
def test_search_overhead_smoke_run_measures_every_trial(tmp_path, shared_ray):
    from bench.search_overhead import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    trials = result["trials"]
    assert len(trials) == 3 and sum(t["warm"] for t in trials) == 1
    for trial in trials:
        assert trial["compute_s"] > 0 and trial["wall_s"] > trial["compute_s"]
        assert 0 < trial["compute_s"] / trial["wall_s"] < 10
        # The record's clock (ask to end) holds Tune's (start to complete).
        assert trial["wall_s"] > trial["tune_wall_s"] - 0.5
    # On a reused actor nothing starts, and the two independent clocks agree.
    (warm,) = [t for t in trials if t["warm"]]
    assert abs(warm["overhead_s"] - warm["tune_overhead_s"]) < 0.5, warm


@pytest.mark.slow
def test_selection_smoke_run_scores_every_trial_on_its_own_test_glyphs(tmp_path, shared_ray):
    from bench.selection import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    (run,) = result["runs"]
    # 2 search trials, both finalists, one repeat each: every one scored on the test glyphs.
    assert run["trials"] == 4 and len(run["test_macro_f1"]) == 4
    assert run["oracle"] == max(run["test_macro_f1"].values())
    assert run["regret"] == pytest.approx(run["oracle"] - run["exported"])
    # The winner's two runs averaged; exported only when that beats their mean on validation.
    ensemble = run["ensemble"]
    assert len(ensemble["members"]) == 2 and run["exported_trial"] in ensemble["members"]
    assert ensemble["shipped"] == (ensemble["validation"] > ensemble["members_validation_mean"])
    single = run["test_macro_f1"][run["exported_trial"]]
    assert run["best_run_of_winner"] == single
    assert run["exported"] == (ensemble["test"] if ensemble["shipped"] else single)
    assert run["test_images"] > run["validation_images"] > 0


@pytest.mark.slow
def test_search_efficiency_smoke_run_has_a_curve_per_method(tmp_path, shared_ray):
    from bench.search_efficiency import SMOKE_EPOCHS, SMOKE_SAMPLES, main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    (run,) = result["runs"]
    assert set(run["curves"]) == {"tpe_asha", "random_fifo"}
    # FIFO runs every epoch of every trial; ASHA at most that, at least one rung each.
    assert run["epochs_spent"]["random_fifo"] == SMOKE_SAMPLES["fifo"] * SMOKE_EPOCHS
    assert SMOKE_SAMPLES["asha"] <= run["epochs_spent"]["tpe_asha"] <= SMOKE_SAMPLES["asha"] * SMOKE_EPOCHS
    for curve in run["curves"].values():
        assert all(0 < a <= b <= 1 for a, b in zip(curve, curve[1:])), "best-so-far never falls"
    assert run["target"] == run["curves"]["random_fifo"][-1]
    for ratio in result["epoch_ratio_to_reach_target"]["random_fifo"]:
        assert 0 < ratio <= 1


def test_throughput_smoke_run_times_loop_raw_and_decode(tmp_path):
    from bench.throughput import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    summary = result["summary"]
    # One clean pair is asked for; a contended pass (the shared Ray is up) adds pairs.
    assert summary["pairs_run"] == len(result["loop_runs"]) == len(result["raw_runs"]) >= 1
    assert summary["loop_images_per_s_median"] > 0 and summary["raw_images_per_s_median"] > 0
    assert 0 < summary["ratio"] < 10 and 0 < summary["ratio_of_step_medians"] < 10
    assert result["decode_augment_per_worker"]["decode_augment_images_per_s"] > 0


def test_export_latency_smoke_run_times_eager_ort_and_int8(tmp_path):
    from bench.export_latency import BATCH_SIZES, main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    (model,) = result["models"]
    assert result["runs"] == 3 and [row["batch"] for row in model["results"]] == list(BATCH_SIZES)
    for row in model["results"]:
        for runtime in ("eager_ms", "onnxruntime_ms", "int8_ms"):
            assert row[runtime]["median"] > 0
        assert 0 < row["ort_over_eager"] < 10 and 0 < row["int8_over_eager"] < 10
        assert row["max_abs_logit_diff"] < 1e-3
    assert result["int8_accuracy"] is None  # the digits check runs in full runs only
    assert set(result["met"]) == {"ort_over_eager", "int8_over_eager"}
    assert "avx512_vnni" in result["machine"]["cpu_int8_flags"]


def test_export_latency_refuses_to_time_a_model_that_is_not_the_export():
    from bench.export_latency import checked

    row = {"batch": 1, "eager_ms": {"median": 2.0, "min": 1.0}, "onnxruntime_ms": {"median": 1.0, "min": 0.5},
           "int8_ms": {"median": 0.5, "min": 0.4}, "max_abs_logit_diff": 1e-7}
    assert checked([row, {**row, "batch": 32}])
    with pytest.raises(BenchError, match="differ from eager's"):
        checked([row, {**row, "batch": 32, "max_abs_logit_diff": 0.3}])
    with pytest.raises(BenchError, match="batch sizes"):
        checked([row])
    with pytest.raises(BenchError, match="a time of zero"):
        checked([row, {**row, "batch": 32, "onnxruntime_ms": {"median": 0.0, "min": 0.0}}])


@pytest.mark.slow
def test_resume_tuner_restore_smoke_run_kills_and_restores(tmp_path, shared_ray):
    import ray

    from bench.resume_tuner_restore import SMOKE, main

    # Both drivers are subprocesses; they join this test's Ray, and the killed one's
    # trials go down with it, as on a cluster.
    samples, address = SMOKE[0], ray.get_runtime_context().gcs_address
    result = _stamped(main(["--smoke", "--results", str(tmp_path), "--address", address]))
    (run,) = result["runs"]
    assert run["driver_killed_after_s"] > 0
    assert 1 <= run["trials_finished_before_kill"] < run["trials_started_before_kill"] <= samples
    assert run["unpickle_calls_during_restore"] > 0  # what docs/benchmarks.md's table is about
    assert run["trials_started_before_kill"] <= run["study_trials"] <= samples
    assert "restore_failed" in run or run["trials_after"] > 0
    assert not math.isnan(run["epochs_trained_twice"])


def test_a_hung_restore_is_recorded_with_where_its_main_thread_stood():
    """The smoke run once hung 600 s in CI after restoring: the restoring driver now dumps
    its stacks before it is killed, and the result names the main thread's frames."""
    import subprocess
    import sys

    from bench.resume_tuner_restore import _main_thread_frames

    code = ("import faulthandler, threading, time\n"
            "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
            "def fit():\n    time.sleep(5)\n"
            "faulthandler.dump_traceback_later(0.2)\nfit()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.5)
    proc.kill()
    frames = _main_thread_frames(proc.stderr.read())
    assert frames.startswith('File "<string>", line 4 in fit;') and "threading.py" not in frames
    assert _main_thread_frames("") == "no stack dump"


def test_report_html_smoke_run_times_a_page_with_every_trial(tmp_path):
    from bench.report_html import main

    result = json.loads(main(["--smoke", "--results", str(tmp_path)]).read_text())
    assert result["trials"] == 12 and result["plots"] >= 8
    assert 0 < result["seconds_median"] and 0 < result["bytes"] < 5_000_000


def test_scan_cache_smoke_run_reads_each_file_once(tmp_path):
    from bench.scan_cache import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    assert result["images"] == 500 and result["cold_s"] > 0
    assert 0 < result["warm_over_cold"] < 1 and result["one_changed_s"] > 0


def test_split_balance_smoke_run_measures_both_rules_on_both_shapes(tmp_path):
    from bench.split_balance import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    for shape in ("digits", "imbalanced_12_classes_20_to_1"):
        stratified, hashed = result[shape]["stratified"], result[shape]["hash"]
        # What each rule is for: the hash keeps old training images out of the held-out
        # splits; a stratified draw re-made per snapshot does not, but balances classes.
        assert hashed["v2_val_images_v1_trained_on"] == 0 < stratified["v2_val_images_v1_trained_on"]
        assert (stratified["per_class_share_abs_deviation_points"]["mean"]
                < hashed["per_class_share_abs_deviation_points"]["mean"])


@pytest.mark.slow
def test_data_stream_smoke_run_times_both_loaders(tmp_path, shared_ray):
    from bench.data_stream import main

    result = _stamped(main(["--smoke", "--results", str(tmp_path)]))
    for loader in ("dataloader", "ray_data"):
        assert len(result["passes"][loader]) == 2  # one A B B A round
        assert all(p["images"] > 0 and p["images_per_s"] > 0 for p in result["passes"][loader])
        assert result["first_epoch"][loader]["wall_s"] > 0
    assert result["ray_data_over_dataloader"] > 0
