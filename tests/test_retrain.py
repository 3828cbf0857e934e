"""Scheduled retraining end to end: snapshots of the digits, real Ray, real ONNX Runtime,
real MLflow (its embedded SQLite registry, and `mlflow server` on loopback).

v1 holds 60 % of each digit class, v2 all of them; v3 drops the 9s and adds a class of
synthetic stripes. Every search is tiny (test_resnet at 16 px, 2 epochs, 3 trials)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from search.config import parse_config
from search.layout import CONFIG, GATE_JSON, GATE_MARKDOWN, REPORT_MARKDOWN, SPLIT
from search.retrain.gate import Decision
from search.retrain.registry import (
    CHALLENGER, CHAMPION, DECISION, FINGERPRINT, REGISTERED, REGISTERING, RUN_DIR, STATE, TRIAL, Registry,
)
from search.retrain.warm import top_configurations
from search.storage import RunStore
from search.results.trials import load_run
from search.study import HISTORY_KEY, read_trials
from tests.conftest import small_run_config
from trainables.data.split_files import read_split
from trainables.data.demo_data import write_digits, write_synthetic

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "description": "retrain test space",
    "needs_pretrained": False,
    "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
    "lr_head": {"low": 1.0e-3, "high": 1.0e-2},
    "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
    "batch_size": [32, 64],
    "losses": {"ce": {}, "label_smoothing": {"smoothing": {"low": 0.05, "high": 0.1}}},
    "warm_start": [{"backbone": "test_resnet", "unfreeze_depth": "all", "lr_head": 5.0e-3, "lr_base_ratio": 1.0,
                    "loss": "ce", "batch_size": 32}],
}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("snapshots")
    full = tmp / "v2"
    write_digits(full, image_size=16)
    v1 = tmp / "v1"
    for cls in sorted(p for p in full.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (v1 / cls.name).mkdir(parents=True)
        for f in files[: int(0.6 * len(files))]:
            shutil.copy2(f, v1 / cls.name / f.name)
    v3 = tmp / "v3"
    shutil.copytree(full, v3, ignore=lambda d, names: ["9"] if Path(d) == full else [])
    stripes = tmp / "stripes"
    write_synthetic(stripes, num_classes=2, images_per_class=150, image_size=16, seed=3)
    shutil.copytree(stripes / "class_0", v3 / "stripes")
    return {"v1": v1, "v2": full, "v3": v3}


def _config(tmp: Path, snapshot: Path, search: dict | None = None, **retrain):
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    raw = small_run_config(
        snapshot, tmp / "runs", data={"image_size": 16}, optim={"epochs": 2, "batch_size": 32, "warmup_epochs": 0.2},
        search={"space": str(space), "num_samples": 3, "max_concurrent_trials": 2,
                "asha": {"grace_period": 1}, "seed": 0, **(search or {})},
        retrain={"model_name": "digits", "snapshot": str(snapshot), "num_samples": 3, "top_k": 2, **retrain},
    )
    return parse_config(raw)


@pytest.fixture(scope="module")
def ray_address():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _registry(tmp: Path) -> Registry:
    return Registry(f"sqlite:///{(tmp / 'runs' / 'mlflow.db').as_posix()}", "digits")


@pytest.mark.slow
def test_retrain_warm_starts_gates_on_new_data_registers_and_never_trains_twice(snapshots, tmp_path, ray_address):
    from search.retrain.job import retrain

    lines = []
    # v1: no champion yet, so a full first search, promoted once its export passed parity.
    first = retrain(_config(tmp_path, snapshots["v1"]), print_fn=lines.append)
    registry = _registry(tmp_path)
    v1 = registry.alias(CHAMPION)
    assert first.promote and first.champion is None and v1.number == "1" and v1.state == REGISTERED
    v1_run = RunStore.at(v1.tags[RUN_DIR])

    # The same snapshot again: said, and nothing trained or registered.
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    lines.clear()
    assert retrain(_config(tmp_path, snapshots["v1"]), print_fn=lines.append) is None
    assert any("nothing to retrain" in line for line in lines), lines
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before
    assert len(registry.versions()) == 1

    # v2: the champion run's top 2 are its first trials, exactly; the gate reads v2's split.
    lines.clear()
    second = retrain(_config(tmp_path, snapshots["v2"], history=True), print_fn=lines.append)
    versions = registry.versions()
    assert [v.number for v in versions] == ["1", "2"]
    v2_run = RunStore.at(versions[1].tags[RUN_DIR])
    first_trials = sorted(read_trials(v2_run, None), key=lambda t: t.number)[:2]
    assert [t.params for t in first_trials] == top_configurations(v1_run, 2)
    # History: v1's finished trials are in the study for TPE, marked with v1's snapshot,
    # and are not trials of this run (the report and the budget count 3).
    history = [t for t in read_trials(v2_run, None) if t.user_attrs.get(HISTORY_KEY)]
    v1_finished = [t for t in load_run(v1_run).trials if t.best_epoch is not None]
    assert len(history) == len(v1_finished) >= 2
    assert {t.user_attrs[HISTORY_KEY] for t in history} == {v1.fingerprint}
    assert sorted(t.value for t in history) == sorted(t.best_epoch["macro_f1"] for t in v1_finished)
    assert len(load_run(v2_run).trials) == 3
    v2_split = read_split(v2_run.uri(SPLIT))
    assert len(v2_split.val) > len(read_split(v1_run.uri(SPLIT)).val)
    # No test split here, so the gate scores validation. Picked by a hash of each path, it
    # holds none of the images the champion trained on (a stratified draw re-made for v2
    # held about half), and the retrain checks and says so.
    v1_trained = {s.sha1 for s in read_split(v1_run.uri(SPLIT)).train}
    assert not any(s.sha1 in v1_trained for s in v2_split.val)
    assert f"the champion trained on 0 of this snapshot's {len(v2_split.val)} validation images" in "\n".join(lines)
    assert second.left_out == 0
    assert second.challenger.num_images == second.champion.num_images == len(v2_split.val)
    assert "Neither model trained on any of them" in v2_run.read_text(GATE_MARKDOWN)
    assert Decision.from_json(v2_run.read_text(GATE_JSON)) == second
    assert registry.alias(CHALLENGER).number == "2"
    expected_champion = "2" if second.promote else "1"
    assert registry.alias(CHAMPION).number == expected_champion
    assert versions[1].tags[DECISION] == ("promote" if second.promote else "refuse")

    # The candidate's MLflow run: metrics, the exported trial's parameters, fingerprint,
    # run directory, and the verified ONNX bundle as its model.
    run = registry.client.get_run(versions[1].run_id)
    assert run.data.metrics["macro_f1"] == pytest.approx(second.challenger.macro_f1)
    assert run.data.tags[FINGERPRINT] == v2_split.fingerprint() and run.data.tags[RUN_DIR] == v2_run.location
    (exported,) = [t for t in load_run(v2_run).trials if t.trial_id == run.data.tags[TRIAL]]
    assert run.data.params == {k: str(v) for k, v in exported.params.items()}
    assert {f.path for f in registry.client.list_artifacts(run.info.run_id, "model")} >= {
        "model/model.onnx", "model/preprocessing.json", "model/class_names.json"}

    # v1 seen again after v2 was decided: older than the newest candidate, so no alias moves back.
    aliases = (registry.alias(CHAMPION).number, registry.alias(CHALLENGER).number)
    assert retrain(_config(tmp_path, snapshots["v1"]), print_fn=lambda *_: None) is None
    assert (registry.alias(CHAMPION).number, registry.alias(CHALLENGER).number) == aliases
    assert len(registry.versions()) == 2


@pytest.mark.slow
def test_a_weak_challenger_on_changed_classes_is_refused_with_its_numbers(snapshots, tmp_path, ray_address):
    from search.retrain.job import retrain

    # The champion: one trial is enough (nothing here checks how it was found).
    retrain(_config(tmp_path, snapshots["v2"], search={"num_samples": 1}), print_fn=lambda *_: None)
    registry = _registry(tmp_path)
    champion = registry.alias(CHAMPION)
    # One trial, no warm start, and a gain no model can make: refused, whatever it scores.
    lines = []
    decision = retrain(_config(tmp_path, snapshots["v3"], num_samples=1, top_k=0, min_gain=0.5),
                       print_fn=lines.append)
    assert not decision.promote
    assert registry.alias(CHAMPION).number == champion.number  # the alias stayed
    assert registry.alias(CHALLENGER).number == "2"
    # The class rule: the new class scores 0 for the champion, the vanished 9 is not scored.
    assert decision.added_classes == ["stripes"] and decision.removed_classes == ["9"]
    assert decision.champion.per_class_f1["stripes"] == 0.0 and "9" not in decision.challenger.per_class_f1
    assert "stripes" not in decision.class_drops
    report = RunStore.at(registry.versions()[-1].tags[RUN_DIR]).read_text(GATE_MARKDOWN)
    assert "**not promoted**" in report and f"{decision.champion.macro_f1:.4f}" in report
    assert "min_gain 0.5" in report and "Class 'stripes' added" in report and "Class '9' removed" in report
    from search.results.report import build_report

    run = RunStore.at(registry.versions()[-1].tags[RUN_DIR])
    assert "Champion/challenger gate" in build_report(load_run(run)).markdown  # `tunecv report` shows it
    # The retrain writes the run's report after its gate: the decision heads report.md and report.html.
    markdown = run.read_text(REPORT_MARKDOWN)
    assert markdown.index("Champion/challenger gate") < markdown.index("trials ranked by")
    from tests.browser import visit

    seen = visit(Path(run.location) / "report.html", tmp_path / "gate.png")
    assert seen.errors == [], seen.errors
    above_trials = seen.text[:seen.text.index("Trials\n")]
    assert "Retrain gate: challenger not promoted (against champion version" in above_trials
    assert "min_gain 0.5" in above_trials and "stripes" in above_trials and "change (+ gain, − loss)" in above_trials
    assert "## " not in seen.text and "**" not in seen.text  # HTML, not Markdown in a <pre>

    # The refused snapshot on the next tick: decided before, so nothing is trained again.
    lines.clear()
    assert retrain(_config(tmp_path, snapshots["v3"], num_samples=1, top_k=0, min_gain=0.5),
                   print_fn=lines.append) is None
    assert any("retrained before" in line for line in lines) and len(registry.versions()) == 2


@pytest.mark.slow
def test_the_second_and_third_retrain_stop_at_the_search_budget(tmp_path, ray_address):
    """Without retrain.time_budget_s every retrain keeps search.time_budget_s, not only the
    first: the later ones, asked for more trials than it holds, stop when it runs out."""
    from search.drivers import read_drivers
    from search.retrain.job import retrain
    from search.study import TIMESTAMP

    # Snapshots of 160 images: an epoch takes about a second once a trial runs.
    snapshots = {}
    for seed, name in enumerate(("v1", "v2", "v3")):
        snapshots[name] = tmp_path / "snapshots" / name
        write_synthetic(snapshots[name], num_classes=4, images_per_class=40, image_size=16, seed=seed)
    # The first registers a model to retrain, under no budget: its one trial ends at its count.
    retrain(_config(tmp_path, snapshots["v1"], search={"num_samples": 1}), print_fn=lambda *_: None)
    registry = _registry(tmp_path)
    # The budget is measured, not guessed: twice what the first retrain took from its
    # driver's start to its trial's first epoch (the driver's set-up, a trial's start, an
    # epoch), 20 s at least. A fixed 20 s ran out before any first epoch in CI under
    # `pytest -n 2`: a trial's start alone took over 20 s there.
    first = RunStore.at(registry.versions()[-1].tags[RUN_DIR])
    (first_driver,) = read_drivers(first)
    to_first_epoch = min(e[TIMESTAMP] for t in load_run(first).trials for e in t.epochs) - first_driver.started
    budget = max(20, int(2 * to_first_epoch))
    print(f"budget {budget} s: {to_first_epoch:.1f} s from the first driver's start to its first epoch")
    later = {"time_budget_s": budget, "max_concurrent_trials": 1}
    for n, snapshot in ((2, "v2"), (3, "v3")):
        lines = []
        retrain(_config(tmp_path, snapshots[snapshot], search=later, num_samples=500, top_k=0), print_fn=lines.append)
        version = registry.versions()[-1]
        run = RunStore.at(version.tags[RUN_DIR])
        assert version.number == str(n) and snapshot in run.read_text(CONFIG)
        status = [line for line in lines if line.startswith("status: trials ")]
        shown = f" of {budget // 60}:{budget % 60:02d}"
        assert status and all(line.endswith(shown) for line in status), (shown, status)  # the budget, shown
        trials = load_run(run).trials
        assert 0 < len(trials) < 500 and any(t.best_epoch for t in trials)  # stopped by the budget, not the count
        # The last result came within the budget of the search's start (the driver's set-up
        # before Tune, and a trial's start, are in the slack).
        (driver,) = read_drivers(run)
        last = max(e[TIMESTAMP] for t in trials for e in t.epochs)
        slack = max(10, to_first_epoch)
        assert last - driver.started < budget + slack, (last - driver.started, budget, slack, lines)


def _serving(server: subprocess.Popen, uri: str, deadline: float) -> bool:
    """True once the server answers its health check; False if it exited or the deadline passed."""
    while time.time() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the module's two server tests: each registers its own model
    names, and every assertion reads through ``Registry(server, name)``."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    # A port found free can be taken before the server binds it (under `pytest -n 2` the
    # other worker's Ray takes ports all the time): the server then exits, and a new
    # port is tried.
    for _ in range(3):
        port = _free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
             "--artifacts-destination", str(tmp / "server-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        uri = f"http://127.0.0.1:{port}"
        if _serving(server, uri, deadline=time.time() + 90):
            break
        with contextlib.suppress(ProcessLookupError):  # it may have exited
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    else:
        pytest.fail(f"the MLflow server did not start in 3 tries (last exit status {server.returncode})")
    yield uri
    # Nothing on this server is worth a graceful stop, which took up to 20 s.
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.mark.slow
def test_killed_and_concurrent_retrains_against_an_mlflow_server(snapshots, tmp_path, ray_address, mlflow_server):
    cfg = _config(tmp_path, snapshots["v1"], search={"num_samples": 1})  # the first retrain: search.num_samples
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_server}
    first = subprocess.Popen([sys.executable, str(REPO / "tests" / "retrain_paused.py"), "registering", "--config",
                              str(config)],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in first.stdout:  # until it has created the version and stopped there
        seen.append(line)
        if line.startswith("paused at registering"):
            break
    else:
        pytest.fail("".join(seen[-30:]))
    registry = Registry(mlflow_server, "digits")
    (half,) = registry.versions()
    assert half.state == REGISTERING and registry.alias(CHAMPION) is None

    # A second retrain of the same model while the first runs: refused, before any work.
    second = subprocess.run([sys.executable, "-m", "search.cli", "retrain", "--config", str(config)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "another `tunecv retrain` of model 'digits' is running" in second.stderr

    first.send_signal(signal.SIGKILL)  # during registration
    first.wait()
    assert registry.alias(CHAMPION) is None and registry.versions()[0].state == REGISTERING
    run_dir = RunStore.at(half.tags[RUN_DIR])
    trials = len(read_trials(run_dir, None))

    # Again: the search is not rerun, the half-made version is abandoned, a whole one registered.
    again = subprocess.run([sys.executable, "-m", "search.cli", "retrain", "--config", str(config)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "left half-registered" in again.stdout and "finished before" in again.stdout
    assert len(read_trials(run_dir, None)) == trials
    states = [(v.number, v.state) for v in registry.versions()]
    assert states == [("1", "abandoned"), ("2", REGISTERED)]
    assert registry.alias(CHAMPION).number == "2"
    assert registry.versions()[1].tags[STATE] == REGISTERED

    # Through the server, a gate against a champion: its ONNX bundle comes back from the
    # server's artifact store and is scored on the new split beside the challenger.
    from search.retrain.job import retrain

    decision = retrain(_config(tmp_path, snapshots["v2"], registry_uri=mlflow_server), print_fn=lambda *_: None)
    assert decision.champion_version == "2"
    assert decision.champion.num_images == decision.challenger.num_images > 0
    assert registry.alias(CHALLENGER).number == "3"


@pytest.mark.slow
def test_a_retrain_killed_in_either_alias_window_is_repaired_by_the_next(snapshots, tmp_path, ray_address,
                                                                         mlflow_server):
    """The windows the registering test leaves: killed before the model version exists (its
    MLflow run logged), and between the challenger alias and the champion alias."""
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": mlflow_server}
    for window in ("model-version", "champion"):
        name = f"digits-{window}"
        # A first retrain searches search.num_samples trials (retrain.num_samples is for later ones).
        cfg = _config(tmp_path, snapshots["v1"], search={"num_samples": 1}, model_name=name)
        config = tmp_path / f"{window}.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        first = subprocess.Popen([sys.executable, str(REPO / "tests" / "retrain_paused.py"), window, "--config",
                                  str(config)], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        seen = []
        for line in first.stdout:
            seen.append(line)
            if line.startswith(f"paused at {window}"):
                break
        else:
            pytest.fail("".join(seen[-30:]))
        first.send_signal(signal.SIGKILL)
        first.wait()
        registry = Registry(mlflow_server, name)
        if window == "model-version":
            assert registry.versions() == []
        else:
            (version,) = registry.versions()
            assert version.state == REGISTERED and registry.alias(CHALLENGER).number == version.number
            assert registry.alias(CHAMPION) is None
        again = subprocess.run([sys.executable, "-m", "search.cli", "retrain", "--config", str(config)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        # Nothing searched again; one whole version, and both aliases on it.
        assert ("finished before" if window == "model-version" else "nothing is trained again") in again.stdout
        assert [(v.number, v.state) for v in registry.versions()] == [("1", REGISTERED)]
        assert registry.alias(CHALLENGER).number == registry.alias(CHAMPION).number == "1", window


# ---- the parts, without Ray ----

def _score(per_class: dict[str, float], known: list[str]):
    from search.retrain.gate import Score

    return Score(sum(per_class.values()) / len(per_class), per_class, 100, known)


def test_gate_promotes_only_on_gain_without_a_class_collapsing():
    from search.retrain.gate import decide

    old = _score({"a": 0.9, "b": 0.8}, ["a", "b"])
    better = _score({"a": 0.92, "b": 0.86}, ["a", "b"])
    assert decide(better, old, "1", min_gain=0.02, max_class_drop=0.05).promote
    assert not decide(better, old, "1", min_gain=0.05, max_class_drop=0.05).promote  # 0.89 < 0.85 + 0.05
    lopsided = _score({"a": 0.99, "b": 0.74}, ["a", "b"])  # more macro-F1, but b loses 0.06
    refused = decide(lopsided, old, "1", min_gain=0.0, max_class_drop=0.05)
    assert not refused.promote and refused.class_drops["b"] == pytest.approx(0.06)
    assert any("'b' by 0.0600" in r for r in refused.reasons)
    assert decide(better, None, None, min_gain=0.5, max_class_drop=0.0).promote  # no champion yet


def _scored(truth: list[int], predicted: list[int]):
    """A Score with its per-image predictions, as score_bundle makes it (classes a, b)."""
    from sklearn.metrics import f1_score

    from search.retrain.gate import Score

    per_class = f1_score(truth, predicted, labels=[0, 1], average=None, zero_division=0.0)
    return Score(float(per_class.mean()), {"a": float(per_class[0]), "b": float(per_class[1])}, len(truth),
                 ["a", "b"], "test", truth, predicted)


def test_gate_a_gain_its_interval_cannot_tell_from_zero_is_no_evidence_whatever_min_gain_says():
    from search.retrain.gate import Decision, decide, describe

    truth = [0] * 20 + [1] * 20
    champion = _scored(truth, [0] * 20 + [1] * 18 + [0] * 2)  # 2 of 40 wrong
    challenger = _scored(truth, [0] * 20 + [1] * 19 + [0])  # 1 of 40 wrong: +0.025, within noise
    decision = decide(challenger, champion, "1", min_gain=0.0, max_class_drop=0.05)
    assert not decision.promote
    assert decision.gain["low"] <= 0 < decision.gain["value"] < decision.gain["high"]
    assert decision.reasons[0].startswith("no evidence of improvement: the gain +0.02")
    clear = _scored(truth * 5, ([0] * 20 + [1] * 20) * 5)  # 200 images, none wrong
    weak = _scored(truth * 5, ([0] * 20 + [1] * 10 + [0] * 10) * 5)  # a quarter wrong
    promoted = decide(clear, weak, "1", min_gain=0.005, max_class_drop=0.5)
    assert promoted.promote and promoted.gain["low"] > 0
    assert "95 % interval of the gain [+" in promoted.reasons[0]
    # Per-class changes are signed as gains: b's F1 rose, so its change is positive.
    row = next(line for line in describe(promoted).splitlines() if line.startswith("| b |"))
    assert row.split("|")[4].strip().startswith("+")
    # A gate.json written before intervals still reads, without a gain.
    raw = json.loads(promoted.to_json())
    del raw["gain"]
    for side in ("challenger", "champion"):
        del raw[side]["labels"], raw[side]["predictions"]
    old = Decision.from_json(json.dumps(raw))
    assert old.gain is None and old.challenger.predictions == [] and old.promote
    legacy = decide(_score({"a": 0.9, "b": 0.9}, ["a", "b"]), _score({"a": 0.8, "b": 0.8}, ["a", "b"]), "1",
                    min_gain=0.005, max_class_drop=0.05)
    assert legacy.promote and legacy.gain is None


def test_the_gate_scores_only_images_neither_model_trained_on():
    from search.retrain.gate import unseen_split
    from trainables.data.datasets import DataSplit, Sample

    train = (Sample("a/1.png", 0, "h1"), Sample("b/1.png", 1, "h2"))
    test = (Sample("a/2.png", 0, "h3"), Sample("a/copy.png", 0, "h1"), Sample("b/2.png", 1, "h4"),
            Sample("b/old.png", 1, "h9"))
    split = DataSplit("/data", ("a", "b"), train, (), (), (), test)
    scored, left_out = unseen_split(split, champion_trained={"h9"})
    # a/copy.png is the challenger's own training image under another name; b/old.png the champion's.
    assert [s.path for s in scored.test] == ["a/2.png", "b/2.png"] and left_out == 2
    assert scored.train == split.train and scored.val == split.val


def test_near_ties_show_the_difference_itself():
    from search.retrain.gate import decide

    champion = _score({"a": 0.99160, "b": 0.99160}, ["a", "b"])
    challenger = _score({"a": 0.99156, "b": 0.99156}, ["a", "b"])
    reason = decide(challenger, champion, "1", min_gain=0.0, max_class_drop=0.05).reasons[0]
    assert "0.99156 is below the champion's 0.99160" in reason and "difference -0.00004" in reason


def test_gate_class_rule_new_class_scores_zero_for_the_champion_and_is_not_a_drop():
    from search.retrain.gate import decide, describe

    # The champion knew a, b, gone; the new snapshot has a, b, new.
    champion = _score({"a": 0.9, "b": 0.9, "new": 0.0}, ["a", "b", "gone"])
    challenger = _score({"a": 0.9, "b": 0.9, "new": 0.7}, ["a", "b", "new"])
    decision = decide(challenger, champion, "3", min_gain=0.0, max_class_drop=0.05)
    assert decision.promote
    assert decision.added_classes == ["new"] and decision.removed_classes == ["gone"]
    assert set(decision.class_drops) == {"a", "b"}
    text = describe(decision)
    assert "Class 'new' added" in text and "champion F1 0" in text and "Class 'gone' removed" in text


def test_fit_point_drops_what_the_current_space_no_longer_has():
    from search.space.model import SearchSpace

    space = SearchSpace.model_validate(SPACE)
    old = {"backbone": "test_resnet", "unfreeze_depth__test_resnet": "all", "lr_head": 5e-3, "lr_base_ratio": 0.9,
           "loss": "focal", "gamma": 2.0, "batch_size": 48, "weight_decay": 0.05}
    point, dropped = space.fit_point(old)
    assert point == {"backbone": "test_resnet", "unfreeze_depth__test_resnet": "all", "lr_head": 5e-3,
                     "lr_base_ratio": 0.9}
    assert set(dropped) == {"loss", "gamma", "batch_size", "weight_decay"}
    assert dropped["loss"] == "'focal' is not a loss of this space"
    assert "48 is not one of [32, 64]" in dropped["batch_size"]


def test_retrain_config_errors_name_the_field_before_any_work(snapshots, tmp_path):
    from search.config import ConfigError
    from search.retrain.job import retrain

    with pytest.raises(ConfigError, match=r"retrain\.snapshot: directory '.*nowhere' does not exist"):
        _config(tmp_path, tmp_path / "nowhere")
    no_section = parse_config(small_run_config(snapshots["v1"], tmp_path / "runs"))
    with pytest.raises(ConfigError, match="needs a `retrain:` section"):
        retrain(no_section)
    in_a_bucket = _config(tmp_path, snapshots["v1"]).model_copy(update={"output_dir": "s3://bucket/runs"})
    with pytest.raises(ConfigError, match="output_dir: tunecv retrain needs a local or shared filesystem"):
        retrain(in_a_bucket)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    raw = _config(tmp_path, snapshots["v1"]).model_dump(mode="json")
    raw["data"]["manifest"] = str(manifest)
    with pytest.raises(ConfigError, match="data.manifest cannot be used with a retrain: section"):
        parse_config(raw)
    assert not (tmp_path / "runs").exists()


def test_the_retrain_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    from search.retrain.job import RetrainBusyError, retrain_lock

    with retrain_lock(tmp_path, "digits"):
        with pytest.raises(RetrainBusyError, match="another `tunecv retrain` of model 'digits' is running"):
            with retrain_lock(tmp_path, "digits"):
                pass
        with retrain_lock(tmp_path, "other-model"):  # per model
            pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from search.retrain.job import retrain_lock;"
                               "cm = retrain_lock(__import__('pathlib').Path(sys.argv[2]), 'digits'); cm.__enter__();"
                               "print('held', flush=True); time.sleep(600)", str(REPO), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RetrainBusyError):
        with retrain_lock(tmp_path, "digits"):
            pass
    holder.kill()
    holder.wait()
    with retrain_lock(tmp_path, "digits"):  # SIGKILL released it: no stale lock
        pass


def test_a_new_registry_and_a_download_print_nothing_of_mlflow_s_own(tmp_path):
    """MLflow's INFO lines and its tqdm download bar stay off the console (issue 26, item 6)."""
    script = (
        "from pathlib import Path\n"
        "from search.retrain.registry import Registry\n"
        f"root = Path({str(tmp_path)!r})\n"
        "registry = Registry(f'sqlite:///{root}/mlflow.db', 'digits', artifact_root=root / 'artifacts')\n"
        "assert registry.alias('champion') is None\n"
        "import mlflow\n"
        "mlflow.set_tracking_uri(f'sqlite:///{root}/mlflow.db')\n"
        "(root / 'bundle').mkdir(); (root / 'bundle' / 'model.onnx').write_bytes(b'x' * 10)\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_artifacts(str(root / 'bundle'), 'model')\n"
        "mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path='model', dst_path=str(root / 'got'))\n"
        "print('done')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "Creating initial MLflow database tables" not in proc.stderr and "INFO" not in proc.stderr
    assert "Downloading artifacts" not in proc.stderr, proc.stderr
