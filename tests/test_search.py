"""The search end to end on a real local Ray: Optuna TPE, ASHA, report, ONNX export."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from search.config import ConfigError, parse_config
from search.layout import REPORT_HTML, REPORT_MARKDOWN, REPORT_PARQUET, SPLIT
from search.results.trials import COMPLETED, FAILED, STOPPED_EARLY, load_run
from search.study import read_trials
from tests.conftest import small_run_config
from trainables.data.split_files import read_split
from tests.fault_hooks import runtime_env

# Three families (ResNet, EfficientNet, ViT), three losses. The warm start runs first,
# one at a time: a good recipe; one that cannot learn in 3 epochs (lr 1e-6), which ASHA
# must stop at its first rung; and one with batch 24, which a test fault
# (tests/fault_hooks.py) makes raise TrialConfigError: it must fail at once, without a
# retry, with its reason, while the search goes on. TPE fills the rest.
SPACE = {
    "description": "test space",
    "needs_pretrained": False,
    "backbones": {
        "test_resnet": {"unfreeze_depth": ["all"]},
        "test_efficientnet": {"unfreeze_depth": ["all"]},
        "test_vit": {"unfreeze_depth": ["all"]},
    },
    "lr_head": {"low": 1.0e-6, "high": 1.0e-2},
    "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
    "batch_size": [16, 24],
    "losses": {"ce": {}, "focal": {"gamma": {"low": 1.0, "high": 2.0}}, "label_smoothing": {"smoothing": {"low": 0.05, "high": 0.1}}},
    "warm_start": [
        {"backbone": "test_resnet", "unfreeze_depth": "all", "lr_head": 3.0e-3, "lr_base_ratio": 1.0, "loss": "ce",
         "batch_size": 16},
        {"backbone": "test_efficientnet", "unfreeze_depth": "all", "lr_head": 1.0e-6, "lr_base_ratio": 1.0,
         "loss": "focal", "gamma": 2.0, "batch_size": 16},
        {"backbone": "test_vit", "unfreeze_depth": "all", "lr_head": 1.0e-3, "lr_base_ratio": 1.0, "loss": "ce",
         "batch_size": 24},
    ],
}


def _search_config(synthetic_root, tmp_path, **search):
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(SPACE))
    raw = small_run_config(
        synthetic_root, tmp_path / "runs", optim={"epochs": 3, "warmup_epochs": 0.2},
        data={"test_fraction": 0.15},
        search={"space": str(space_path), "num_samples": 6, "max_concurrent_trials": 1,
                "asha": {"grace_period": 1, "reduction_factor": 2}, "seed": 0, **search},
    )
    return parse_config(raw)


@pytest.fixture(scope="module")
def search_run(synthetic_root, tmp_path_factory):
    import ray

    from search.run.driver import run_search

    tmp = tmp_path_factory.mktemp("search")
    lines = []
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(config_error={"optim.batch_size": 24}))
    try:
        store = run_search(_search_config(synthetic_root, tmp), print_fn=lines.append)
    finally:
        ray.shutdown()
    return store, lines


@pytest.mark.slow
def test_every_trial_is_recorded_with_a_status(search_run):
    store, _ = search_run
    trials = load_run(store).trials
    assert len(trials) == 6
    assert len({t.trial_id for t in trials}) == 6
    assert all(t.status in (COMPLETED, STOPPED_EARLY, FAILED) for t in trials)
    assert {t.config.model.backbone for t in trials} >= {"test_resnet", "test_efficientnet", "test_vit"}
    assert len({t.config.loss.type for t in trials}) >= 2


@pytest.mark.slow
def test_asha_stops_the_hopeless_warm_start_early_and_optuna_sees_it_pruned(search_run):
    import optuna

    store, _ = search_run
    hopeless = [t for t in load_run(store).trials if t.params.get("lr_head") == 1.0e-6]
    assert len(hopeless) == 1 and hopeless[0].status == STOPPED_EARLY
    assert len(hopeless[0].epochs) < 3
    (study_trial,) = [t for t in read_trials(store, None) if t.params.get("lr_head") == 1.0e-6]
    assert study_trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(study_trial.intermediate_values) == [e["epoch"] for e in hopeless[0].epochs]


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_failed_and_the_searcher_is_told(search_run):
    import optuna

    store, _ = search_run
    trials = load_run(store).trials
    failed = [t for t in trials if t.status == FAILED]
    assert failed and all(t.config.optim.batch_size == 24 for t in failed)
    assert all(t.reason.startswith("TrialConfigError: test fault") and t.reason.endswith("(not retried)")
               for t in failed)
    assert all(t.attempts == 1 and not t.failures for t in failed)  # max_failures is 2: no retry happened
    states = [t.state for t in read_trials(store, None)]
    State = optuna.trial.TrialState
    assert states.count(State.FAIL) == len(failed)
    assert states.count(State.COMPLETE) == sum(t.status == COMPLETED for t in trials)
    assert states.count(State.PRUNED) == sum(t.status == STOPPED_EARLY for t in trials)


@pytest.mark.slow
def test_report_ranks_by_macro_f1_and_lists_every_trial(search_run):
    store, lines = search_run
    run_dir = Path(store.location)
    table = pq.read_table(run_dir / REPORT_PARQUET).to_pylist()
    assert len(table) == 6 and [r["rank"] for r in table] == list(range(1, 7))
    scores = [r["macro_f1"] for r in table if not math.isnan(r["macro_f1"])]
    assert scores == sorted(scores, reverse=True)
    assert table[0]["macro_f1"] > 0.6  # chance is ~0.25 with 4 balanced classes
    assert math.isnan(table[-1]["macro_f1"]) and table[-1]["status"] == FAILED  # failed rank last
    md = (run_dir / REPORT_MARKDOWN).read_text()
    for row in table:
        assert row["trial_id"] in md
    assert "Confusion matrix" in md and "class_3" in md
    assert any("macro_f1" in line and "epoch" in line for line in lines)  # live progress


@pytest.mark.slow
def test_report_html_in_a_browser_shows_stopped_and_failed_trials_and_the_export(search_run, tmp_path):
    from tests.browser import visit

    page_file = Path(search_run[0].location) / REPORT_HTML
    seen = visit(page_file, tmp_path / "search_report.png")
    assert seen.errors == [] and seen.requests == [page_file.resolve().as_uri()]
    assert len(seen.plots) >= 5 and all(traces > 0 for traces in seen.plots.values()), seen.plots
    assert {"completed", "stopped_early", "failed"} <= set(seen.statuses)
    assert "TrialConfigError: test fault" in seen.text
    assert "ONNX macro_f1 (recomputed)" in seen.text  # the report follows the export
    assert page_file.stat().st_size < 5_000_000


@pytest.mark.slow
def test_the_study_opens_in_optuna_dashboard(search_run, tmp_path):
    """docs/search.md's `optuna-dashboard RUN/optuna.journal`, on loopback, read back through its API."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    store, _ = search_run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(dashboard), str(Path(store.location) / "optuna.journal"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/api/studies"
    try:
        deadline = time.time() + 90
        while True:
            try:
                studies = json.loads(urllib.request.urlopen(url, timeout=5).read())["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"optuna-dashboard exited: {proc.stdout.read()[-2000:]}")
                assert time.time() < deadline, "optuna-dashboard did not answer in 90 s"
                time.sleep(0.5)
        (summary,) = studies
        assert summary["study_name"] == Path(store.location).name
        served = json.loads(urllib.request.urlopen(f"{url}/{summary['study_id']}", timeout=30).read())["trials"]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # gunicorn and its worker
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    stored = read_trials(store, None)
    assert [t["number"] for t in served] == [t.number for t in stored]
    for got, want in zip(served, stored):
        assert got["state"].upper() == want.state.name
        # The API serves every parameter value as str(value).
        assert {p["name"]: p["param_external_value"] for p in got["params"]} == {
            k: str(v) for k, v in want.params.items()}
        assert {v["step"]: v["value"] for v in got["intermediate_values"]} == want.intermediate_values


@pytest.mark.slow
def test_winner_is_exported_and_verified(search_run):
    run_dir = Path(search_run[0].location)
    export = run_dir / "export"
    for name in ("model.onnx", "class_names.json", "preprocessing.json", "metrics.json"):
        assert (export / name).is_file(), name
    metrics = json.loads((export / "metrics.json").read_text())
    top = pq.read_table(run_dir / REPORT_PARQUET).to_pylist()[0]
    flat = json.dumps(metrics)
    assert f"{top['macro_f1']}"[:6] in flat
    # The held-out test split (data.test_fraction 0.15) scores the exported model.
    split = read_split(run_dir / SPLIT)
    test = metrics["test"]
    assert test["num_images"] == len(split.test) > 0
    assert not {s.path for s in split.test} & {s.path for s in (*split.train, *split.val)}
    low, high = test["macro_f1_interval"]["low"], test["macro_f1_interval"]["high"]
    assert 0.0 <= low <= test["macro_f1"] <= high <= 1.0
    assert set(test["per_class"]) == set(json.loads((export / "class_names.json").read_text()))
    # Recomputed as a user would: the bundle's preprocessing, ONNX Runtime, scikit-learn.
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    from sklearn.metrics import f1_score

    from trainables.data.transforms import eval_transform_from_spec

    transform = eval_transform_from_spec(json.loads((export / "preprocessing.json").read_text()))
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([np.asarray(transform(image=np.asarray(Image.open(Path(split.root) / s.path).convert("RGB")))
                                 ["image"]) for s in split.test]).astype(np.float32)
    predicted = session.run(["logits"], {"input": batch})[0].argmax(1)
    labels = [s.label for s in split.test]
    recomputed = f1_score(labels, predicted, average="macro", labels=range(len(split.class_names)), zero_division=0)
    assert test["macro_f1"] == pytest.approx(recomputed, abs=1e-9)


@pytest.mark.slow
def test_report_rebuilds_from_the_run_via_cli_without_writing_into_it(search_run, tmp_path, tunecv_here):
    store, _ = search_run
    before = (Path(store.location) / REPORT_PARQUET).read_bytes()
    # In this process (the CLI's main): `tunecv report` as a subprocess is test_object_store's.
    proc = tunecv_here("report", store.location, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sum(t.trial_id in proc.stdout for t in load_run(store).trials) == 6
    rebuilt = pq.read_table(tmp_path / "out" / REPORT_PARQUET).to_pylist()
    written = pq.read_table(Path(store.location) / REPORT_PARQUET).to_pylist()
    assert [r["trial_id"] for r in rebuilt] == [r["trial_id"] for r in written]
    assert (Path(store.location) / REPORT_PARQUET).read_bytes() == before  # the driver's file is untouched


@pytest.mark.slow
def test_export_into_a_folder_of_the_users_files_is_refused_unless_told(search_run, tmp_path, tunecv_here):
    store, _ = search_run
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "README.md").write_text("my project\n")
    # In this process (the CLI's main): `tunecv export` as a subprocess is test_object_store's.
    cli = ["export", store.location, "--out", project]
    proc = tunecv_here(*cli)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tunecv: error: OUT '{project}' is not empty (1 entries: README.md); nothing was written. Give a new or "
        "empty directory, or --overwrite to replace files of the same names.")
    assert [p.name for p in project.iterdir()] == ["README.md"]
    assert (project / "README.md").read_text() == "my project\n"
    proc = tunecv_here(*cli, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (project / "model.onnx").is_file() and (project / "README.md").read_text() != "my project\n"


def test_bad_space_fails_before_ray_or_data(tmp_path, synthetic_root):
    import ray

    from search.run.driver import run_search
    from search.space.model import SpaceError

    cfg = _search_config(synthetic_root, tmp_path)  # writes the good space.yaml...
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(dict(SPACE, losses={"hinge": {}})))  # ...spoil it
    with pytest.raises((SpaceError, ConfigError), match="hinge"):
        run_search(cfg, print_fn=lambda *_: None)
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_bad_search_config_is_named(tmp_path):
    (tmp_path / "d").mkdir()
    raw = small_run_config(tmp_path / "d", tmp_path, search={"num_samples": 0, "asha": {"grace_period": 9}})
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "search.num_samples" in str(info.value)


def test_tune_keeps_as_many_trials_pending_as_the_search_runs_at_once(monkeypatch):
    """With TUNE_MAX_PENDING_TRIALS_PG=1 the simulated cluster started one trial at a time:
    24.5 trials/min against 110 with Tune's default (bench/results/cluster_sim_100*.json).
    That default, for a searcher Tune wraps in a ConcurrencyLimiter (search.max_concurrent_trials
    is always set), is the limit itself; tunecv leaves it. A Ray that changes it fails here."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    assert _get_max_pending_trials(SearchGenerator(ConcurrencyLimiter(Searcher(), max_concurrent=16))) == 16
