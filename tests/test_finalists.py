"""The finalists (search/run/finalists.py, search/results/selection.py): which
configurations run again, how the winner is chosen from their runs, how a resume
carries them on, and one real search through Ray that ends with them."""

import json
from pathlib import Path

import pytest
import yaml

from search.config import parse_config
from search.results.report import finalists_markdown
from search.results.selection import finalist_groups, selection_order, selection_rule
from search.results.trials import COMPLETED, FAILED, TrialView, load_run
from search.run.finalists import chosen_finalists, choose_finalists, enqueue_finalists, queued_finalists
from search.run.resume import plan_resume
from search.run.trial import trial_config
from search.storage import RunStore
from search.study import CHECKPOINT, FINALIST_OF, SEED_KEY, TIMESTAMP, TRIAL_ID_KEY, epoch_key, open_study
from tests.conftest import small_run_config
from tests.test_resume import DIST, _trial
from trainables.model.checkpoint import METRICS_FILE, RESUMABLE_FILES
from trainables.data.datasets import DataSplit, Sample
from trainables.training.metrics import PREDICTIONS

State = __import__("optuna").trial.TrialState


def _cfg(tmp_path, **finalists):
    (tmp_path / "data").mkdir(exist_ok=True)
    return parse_config(small_run_config(tmp_path / "data", tmp_path, optim={"epochs": 2},
                                         search={"num_samples": 3, "finalists": {"k": 3, **finalists}}))


def _view(cfg, trial_id, score, finalist_of=None, status=COMPLETED, checkpoint=None):
    epochs = () if score is None else (
        {"epoch": 1, "macro_f1": score, "val_loss": 1.0 - score, "num_params": 10, CHECKPOINT: checkpoint},)
    return TrialView(trial_id, {"lr_head": 1e-3}, trial_config(cfg.trial().model_dump(mode="json"), {}), status,
                     None, (), epochs, 1.0, finalist_of)


def test_the_best_mean_over_seeds_wins_not_the_best_single_run(tmp_path):
    cfg = _cfg(tmp_path)
    trials = [
        _view(cfg, "t0000", 0.90), _view(cfg, "t0001", 0.89), _view(cfg, "t0002", 0.50),
        _view(cfg, "t0003", 0.80, finalist_of="t0000"),  # t0000's 0.90 was its lucky seed
        _view(cfg, "t0004", 0.88, finalist_of="t0001"), _view(cfg, "t0005", 0.895, finalist_of="t0001"),
    ]
    groups = finalist_groups(trials)
    assert [g.source for g in groups] == ["t0001", "t0000"]
    assert groups[0].mean == pytest.approx((0.89 + 0.88 + 0.895) / 3)
    assert groups[1].spread == pytest.approx(0.0707, abs=1e-4)
    # The winning configuration's best run is exported, then the rest in order.
    assert [t.trial_id for t in selection_order(trials)][:3] == ["t0005", "t0001", "t0004"]
    assert "configuration of t0001" in selection_rule(trials)
    table = "\n".join(finalists_markdown(groups))
    assert "| `t0001` | t0001, t0004, t0005 | 0.8900, 0.8800, 0.8950 | 0.8883 |" in table
    assert "yes (`t0005`)" in table and table.count("yes (") == 1
    # Without finalists the ranking decides.
    plain = trials[:3]
    assert finalist_groups(plain) == [] and selection_order(plain)[0].trial_id == "t0000"


def _split(n_val: int) -> DataSplit:
    val = tuple(Sample(f"v/{i}.png", i % 2, "0" * 40) for i in range(n_val))
    return DataSplit("/d", ("a", "b"), (Sample("t/0.png", 0, "1" * 40),), val, (), ())


def test_small_validation_always_takes_the_top_k_and_a_large_one_only_the_tied(tmp_path):
    cfg = _cfg(tmp_path)
    store = RunStore.at(tmp_path / "run")
    labels = [i % 2 for i in range(60)]
    wrong = {"t0000": 0, "t0001": 1, "t0002": 12}  # t0001: one image behind; t0002: clearly behind
    trials = []
    for trial_id, errors in wrong.items():
        preds = [1 - y if i < errors else y for i, y in enumerate(labels)]
        rel = f"tune/001/{trial_id}/checkpoint_000000"
        store.write_text(f"{rel}/{METRICS_FILE}", json.dumps({PREDICTIONS: preds}))
        trials.append(_view(cfg, trial_id, 1.0 - errors / 60, checkpoint=rel))
    trials += [_view(cfg, "t0003", None, status=FAILED)]

    chosen, why = choose_finalists(store, trials, _split(60), cfg)
    assert chosen == ["t0000", "t0001", "t0002"] and "60 validation images" in why
    large = _cfg(tmp_path, always_below=50)
    chosen, why = choose_finalists(store, trials, _split(60), large)
    assert chosen == ["t0000", "t0001"], why
    clear = [t for t in trials if t.trial_id != "t0001"]
    chosen, why = choose_finalists(store, clear, _split(60), large)
    assert chosen == [] and "leads" in why


def test_a_resumed_run_continues_its_finalists_and_searches_no_more(tmp_path):
    """The driver died while a finalist run trained: the next one starts no new search
    trial, continues that run from its checkpoint with its seed, and runs the queued one."""
    cfg = _cfg(tmp_path, k=2, repeats=1)
    store = RunStore.at(tmp_path / "run")
    handle = open_study(store, None)
    study = handle.study
    ids = [_trial(store, study, 2, scores={2: s}, tell=s) for s in (0.7, 0.9, 0.8)]
    trials = [_view(cfg, i, s) for i, s in zip(ids, (0.7, 0.9, 0.8))]
    enqueue_finalists(study, trials, [ids[1], ids[2]], cfg)
    enqueue_finalists(study, trials, [ids[1], ids[2]], cfg)  # a driver that died before recording: no duplicates
    assert chosen_finalists(study) == [ids[1], ids[2]] and len(queued_finalists(study)) == 2

    running = study.ask(DIST)  # the dead driver's first finalist run, one epoch in
    running.set_user_attr(TRIAL_ID_KEY, f"t{running.number:04d}")
    rel = f"tune/001-finalists/t{running.number:04d}/checkpoint_000000"
    running.set_user_attr(epoch_key(1), {"epoch": 1, "macro_f1": 0.85, TIMESTAMP: 1.0, CHECKPOINT: rel})
    for name in RESUMABLE_FILES:
        store.write_text(f"{rel}/{name}", "{}")
    assert running.user_attrs[FINALIST_OF] == ids[1] and running.user_attrs[SEED_KEY] == cfg.optim.seed + 1

    plan = plan_resume(handle, store, cfg, None, 0.0)
    assert plan.num_samples == 0  # the search itself is over
    assert sorted(plan.finished) == sorted(ids)
    queued = queued_finalists(study)
    assert [t.user_attrs[FINALIST_OF] for t in queued] == [ids[2], ids[1]]
    continued = queued[1]
    assert continued.user_attrs[TRIAL_ID_KEY] == f"t{running.number:04d}"
    assert continued.user_attrs[SEED_KEY] == cfg.optim.seed + 1


SPACE = {
    "description": "finalists test space",
    "needs_pretrained": False,
    "backbones": {"test_resnet": {"unfreeze_depth": ["all"]}},
    "lr_head": {"low": 1.0e-3, "high": 1.0e-2},
    "lr_base": {"ratio": {"low": 0.5, "high": 1.0}},
    "batch_size": [16],
    "losses": {"ce": {}},
}


@pytest.mark.slow
def test_a_search_runs_its_finalists_with_new_seeds_and_exports_the_best_mean(synthetic_root, tmp_path):
    import ray

    from search.run.driver import run_search

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    raw = small_run_config(synthetic_root, tmp_path / "runs", optim={"epochs": 1}, data={"test_fraction": 0.15},
                           search={"space": str(space), "num_samples": 3, "scheduler": "fifo", "seed": 0,
                                   "max_concurrent_trials": 1, "finalists": {"k": 2, "repeats": 1}})
    lines = []
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        store = run_search(parse_config(raw), print_fn=lines.append)
    finally:
        ray.shutdown()
    trials = load_run(store).trials
    repeats = [t for t in trials if t.finalist_of is not None]
    assert len(trials) == 5 and all(t.status == COMPLETED for t in trials), [(t.trial_id, t.status) for t in trials]
    by_id = {t.trial_id: t for t in trials}
    for t in repeats:
        assert t.params == by_id[t.finalist_of].params and t.config.optim.seed == 1
        assert t.epochs[0][CHECKPOINT].startswith(f"tune/001-finalists/{t.trial_id}/")
    assert sorted(t.finalist_of for t in repeats) == sorted(
        t.trial_id for t in selection_order([t for t in trials if t.finalist_of is None])[:2])
    assert any(line.startswith("finalists: ") for line in lines), lines
    metrics = json.loads((Path(store.location) / "export" / "metrics.json").read_text())
    assert metrics["source"]["trial_id"] == selection_order(trials)[0].trial_id
    assert "best finalist" in metrics["source"]["chosen_by"]
    # Each finalist's best run on the test split; the exported one scores there as its ONNX model does.
    finalists = metrics["finalists"]
    assert [f["configuration_of"] for f in finalists] == [g.source for g in finalist_groups(trials)]
    assert finalists[0]["trial_id"] == metrics["source"]["trial_id"]
    # The winner's runs averaged (search/export/ensemble.py), shipped only when that beats their mean.
    ensemble, winner = metrics["ensemble"], finalist_groups(trials)[0]
    assert ensemble["members"] == [m.trial_id for m in winner.members]
    assert ensemble["members_mean_macro_f1"] == pytest.approx(winner.mean)
    assert ensemble["shipped"] == (ensemble["validation_macro_f1"] > ensemble["members_mean_macro_f1"])
    shipped_test = ensemble["test"] if ensemble["shipped"] else finalists[0]["test"]
    if ensemble["shipped"]:
        assert metrics["source"]["members"] == ensemble["members"]
        assert metrics["verification"]["reported_macro_f1"] == pytest.approx(ensemble["validation_macro_f1"])
    # (PyTorch against ONNX Runtime: an image on a near-tie may flip, hence not exact.)
    assert shipped_test["macro_f1"] == pytest.approx(metrics["test"]["macro_f1"], abs=0.05)
    assert all(f["test"]["num_images"] == metrics["test"]["num_images"] > 0 for f in finalists)
    report = (Path(store.location) / "report.md").read_text()
    assert "## Finalists" in report and f"{finalists[1]['test']['macro_f1']:.4f} (" in report

    # The page, in headless Chromium: the held-out score, the intervals and the finalists.
    from tests.browser import visit

    seen = visit(Path(store.location) / "report.html", tmp_path / "report.png")
    assert seen.errors == [], seen.errors
    assert f"{metrics['test']['macro_f1']:.4f}, 95 % interval" in seen.text
    assert "Finalists" in seen.text and "std over seeds" in seen.text
    assert "Ensemble of the best configuration's runs" in seen.text
    assert ("ensemble of " in seen.text) == ensemble["shipped"]  # the finalists table's "exported" cell
    assert "95 % interval" in seen.text and ("tied" in seen.text or "behind" in seen.text)
    assert len(seen.statuses) == 5
