"""``report.html`` in a real headless Chromium: a run with completed, ASHA-stopped,
failed and still-running trials (built without Ray by bench/synthetic_run.py), reported
mid-run by ``tunecv report --out``."""


import pytest

from bench.synthetic_run import write_synthetic_run
from search.cli import main
from search.layout import REPORT_HTML, REPORT_MARKDOWN, REPORT_PARQUET
from tests.browser import chromium_path, visit

MAX_BYTES = 5_000_000


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    chromium_path()  # skip (or fail in CI) before building anything
    tmp = tmp_path_factory.mktemp("html")
    run = write_synthetic_run(tmp / "runs" / "synthetic-20261130-000000", 16, running=2, finished=False)
    assert main(["report", run.location, "--out", str(tmp / "out")]) == 0
    page_file = tmp / "out" / REPORT_HTML
    return page_file, visit(page_file, tmp / "report.png"), tmp


def test_mid_run_report_writes_all_three_files(page):
    page_file, _, tmp = page
    assert {p.name for p in page_file.parent.iterdir()} == {REPORT_HTML, REPORT_MARKDOWN, REPORT_PARQUET}
    assert 0 < page_file.stat().st_size < MAX_BYTES


def test_the_page_loads_offline_without_errors(page):
    page_file, seen, _ = page
    assert seen.errors == []
    assert seen.requests == [page_file.resolve().as_uri()]  # the page itself, nothing else


def test_every_plot_is_drawn_with_data(page):
    _, seen, _ = page
    # history, learning curves, parallel coordinates, importances, then a confusion
    # matrix and per-class bars for each of the top three
    assert len(seen.plots) == 10
    assert all(traces > 0 for traces in seen.plots.values()), seen.plots


def test_the_table_lists_every_trial_and_sorts(page):
    _, seen, _ = page
    assert len(seen.statuses) == 16
    assert {"completed", "stopped_early", "failed", "running"} <= set(seen.statuses)
    values = [float(v) for v in seen.sorted_f1]
    assert values == sorted(values)  # ascending after one click on the macro_f1 header
    assert "RuntimeError: CUDA out of memory (simulated)" in seen.text


def test_data_export_config_and_space_are_shown(page):
    _, seen, tmp = page
    assert "Imbalanced training set" in seen.text and "class_3/broken.png" in seen.text
    assert "Nothing exported yet" in seen.text  # mid-run: the winner is exported at the end
    assert "Run config" in seen.text and "Search space" in seen.text
    assert (tmp / "report.png").stat().st_size > 10_000


def test_too_few_trials_for_importances_says_so(tmp_path):
    from search.results.report import build_report
    from search.results.trials import load_run

    run = write_synthetic_run(tmp_path / "runs" / "few-20261130-000000", 3, seed=1)
    html = build_report(load_run(run)).html
    assert "Parameter importances need at least 5 trials with a result; this run has" in html


def test_learning_curves_share_a_trace_per_status_beyond_the_legend_s_trials(tmp_path):
    """A trace per trial up to TRIALS_IN_LEGEND; beyond, one per status, the curves kept
    apart by gaps and each point still naming its trial (1,000 traces took plotly 1 s)."""
    from search.results.figures import TRIALS_IN_LEGEND, learning_curves
    from search.results.trials import load_run

    trials = load_run(write_synthetic_run(tmp_path / "runs" / "many-20261207-000000", TRIALS_IN_LEGEND + 5,
                                          running=2, finished=False)).trials
    shown = [t for t in trials if t.epochs]
    grouped = learning_curves(list(trials), rungs=[1])
    by_status = {t.status for t in shown}
    assert len(grouped.data) == len(by_status) < len(shown)
    for trace in grouped.data:
        status = trace.name.split(" (")[0]
        group = [t for t in shown if t.status == status]
        assert trace.name == f"{status} ({len(group)} trials)"
        points = [(x, text) for x, text in zip(trace.x, trace.text) if x is not None]
        assert points == [(e["epoch"], f"{t.trial_id} {t.config.model.backbone}") for t in group for e in t.epochs]
        assert sum(x is None for x in trace.x) == len(group) - 1  # a gap between two trials' curves
    per_trial = learning_curves(shown[:TRIALS_IN_LEGEND], rungs=[1])
    assert [trace.name for trace in per_trial.data] == [f"{t.trial_id} ({t.status})" for t in shown[:TRIALS_IN_LEGEND]]


def test_parallel_coordinates_draw_the_best_trials_beyond_the_limit(tmp_path):
    """Optuna draws a trace per trial: beyond the limit, only the best trials' lines, and
    the title says how many of how many."""
    from search.results.figures import parallel_coordinates, parameter_study
    from search.results.trials import load_run

    run = load_run(write_synthetic_run(tmp_path / "runs" / "lines-20261207-000000", 12, seed=2))
    study = parameter_study(list(run.trials), run.space)
    values = sorted((t.value for t in study.trials), reverse=True)
    assert len(values) > 5
    whole, best = parallel_coordinates(study, limit=len(values)), parallel_coordinates(study, limit=5)
    lines = [trace for trace in best.data if trace.mode == "lines"]
    assert len([trace for trace in whole.data if trace.mode == "lines"]) == len(values)
    assert len(lines) == 5
    assert best.layout.title.text.startswith(f"Parallel coordinates of the best 5 of {len(values)} trials")
    assert whole.layout.title.text.startswith("Parallel coordinates (colour")
    # Colour is the value: the 5 lines drawn are the 5 best values, by the colour bar's range.
    colour_bar = best.data[-1].marker
    assert (colour_bar.cmin, colour_bar.cmax) == (min(values[:5]), max(values[:5]))


def test_intervals_are_for_the_top_trials_and_only_theirs_are_read(tmp_path, monkeypatch):
    """Each interval needs its trial's checkpoint metrics, a read per trial: the report
    reads the top TOP_WITH_INTERVALS trials' only, and the rows below get none."""
    import math

    from search.results import report
    from search.results.trials import load_run

    run = load_run(write_synthetic_run(tmp_path / "runs" / "top-20261207-000000", 12, seed=3))
    read, read_details = [], report.read_epoch_details
    monkeypatch.setattr(report, "read_epoch_details", lambda store, t: read.append(t.trial_id) or
                        read_details(store, t))
    monkeypatch.setattr(report, "TOP_WITH_INTERVALS", 4)
    rows = report.build_report(run).rows
    scored = [r for r in rows if r["best_epoch"]]
    assert len(scored) > 4
    assert sorted(read) == sorted(r["trial_id"] for r in scored[:4])
    assert all(r["macro_f1_low"] < r["macro_f1_high"] and r["vs_leader"] for r in scored[:4])
    assert scored[0]["vs_leader"] == report.LEADER
    assert all(math.isnan(r["macro_f1_low"]) and r["vs_leader"] == "" for r in rows[4:])
