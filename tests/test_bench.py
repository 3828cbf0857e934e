"""Benchmarks check what they read: a smoke run of the real script, and the refusal to
write a result when trials and records do not match."""

import json
from types import SimpleNamespace

import pytest

from bench._common import BenchError
from bench.search_overhead import TrialClock, measured_trials


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
def test_search_overhead_smoke_run_measures_every_trial(tmp_path):
    from bench.search_overhead import main

    result = json.loads(main(["--smoke", "--results", str(tmp_path)]).read_text())
    assert result["commit"] and result["measured_at"]
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
