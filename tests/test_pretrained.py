"""Fine-tuning from local pretrained weights that tunecv wrote itself: pretrain on digits
0-4, keep each backbone's weights as ``<weights_dir>/<timm name>.safetensors``, then
fine-tune on digits 5-9, alone and in a search over three backbones."""

import json
import shutil

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_model

from search.config import ConfigError, parse_config
from search.jobs.train import train
from search.results.trials import COMPLETED, load_run
from trainables.model.checkpoint import WEIGHTS_FILE
from trainables.data.demo_data import write_digits
from trainables.training.reporting import LAST_DIR
from tests.conftest import small_run_config

BACKBONES = ("test_resnet", "test_efficientnet", "test_convnext")


def _config(root, out, model, **optim):
    optim = {"epochs": 2, "batch_size": 32, "lr_head": 1e-2, "lr_base": 3e-3, **optim}
    return parse_config(small_run_config(root, out, model=model, optim=optim))


def _scores(run_dir) -> list[float]:
    return [json.loads(line)["macro_f1"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_halves(tmp_path_factory):
    """Digits 0-4 to pretrain on and 5-9 to fine-tune on (32 px), and a weights directory
    holding each of ``BACKBONES`` after 3 epochs (1 for all but ResNet) on 0-4."""
    tmp = tmp_path_factory.mktemp("pretrained")
    write_digits(tmp / "all", image_size=32)
    for class_dir in sorted((tmp / "all").iterdir()):
        shutil.copytree(class_dir, tmp / ("first" if int(class_dir.name[-1]) < 5 else "second") / class_dir.name)
    weights = tmp / "weights"
    weights.mkdir()
    for backbone in BACKBONES:
        epochs = 3 if backbone == "test_resnet" else 1
        cfg = _config(tmp / "first", tmp / "pretrain", {"backbone": backbone, "pretrained": False},
                      epochs=epochs, lr_head=3e-3)
        run_dir = train(cfg, print_fn=lambda *_: None)
        shutil.copy(run_dir / LAST_DIR / WEIGHTS_FILE, weights / f"{backbone}.safetensors")
    return tmp / "second", weights


def test_head_only_on_pretrained_features_is_far_above_chance(digits_halves, tmp_path):
    """Depth 0 trains only the head: on features pretrained on other digits it learns;
    on frozen random features (the control) it does not. Chance macro-F1 is 0.2."""
    second, weights = digits_halves
    model = {"backbone": "test_resnet", "pretrained": True, "weights_dir": str(weights), "unfreeze_depth": 0}
    pretrained = _scores(train(_config(second, tmp_path / "a", model), print_fn=lambda *_: None))

    random_dir = tmp_path / "random_weights"
    random_dir.mkdir()
    save_model(timm.create_model("test_resnet", num_classes=5), str(random_dir / "test_resnet.safetensors"))
    random = _scores(train(_config(second, tmp_path / "b", {**model, "weights_dir": str(random_dir)}),
                           print_fn=lambda *_: None))
    assert max(pretrained) > 0.55, pretrained  # measured 0.73 after 2 epochs
    assert max(pretrained) > max(random) + 0.3, (pretrained, random)  # random: 0.10


def _space(tmp_path, backbones=BACKBONES):
    space = {
        "description": "head-only fine-tuning of three pretrained backbones",
        "needs_pretrained": True,
        "backbones": {name: {"unfreeze_depth": [0]} for name in backbones},
        "lr_head": {"low": 3.0e-3, "high": 3.0e-2},
        "lr_base": {"ratio": {"low": 0.1, "high": 0.3}},
        "losses": {"ce": {}},
        # One recipe per backbone, so a 3-trial search runs each of them.
        "warm_start": [{"backbone": name, "unfreeze_depth": 0, "lr_head": 1.0e-2, "lr_base_ratio": 0.3,
                        "loss": "ce"} for name in backbones],
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _search_config(second, weights, tmp_path, space_path):
    return parse_config(small_run_config(
        second, tmp_path / "runs",
        model={"backbone": "test_resnet", "pretrained": True, "weights_dir": str(weights)},
        optim={"epochs": 2, "batch_size": 32},
        search={"space": str(space_path), "num_samples": 3, "max_concurrent_trials": 1, "scheduler": "fifo",
                "export": False},
    ))


@pytest.mark.slow
def test_a_search_loads_each_backbones_own_weights(digits_halves, tmp_path, monkeypatch):
    import ray

    from search.run.driver import run_search

    second, weights = digits_halves
    # As the run-file example (docs/run-file.md) writes it: `weights_dir: weights`, relative to where tunecv
    # runs. Trials run in their own directories, so the driver hands them an absolute path.
    monkeypatch.chdir(weights.parent)
    cfg = _search_config(second, weights.relative_to(weights.parent), tmp_path, _space(tmp_path))
    assert cfg.model.weights_dir == weights
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        store = run_search(cfg, print_fn=lambda *_: None)
    finally:
        ray.shutdown()
    trials = load_run(store).trials
    assert sorted(t.config.model.backbone for t in trials) == sorted(BACKBONES)
    for trial in trials:
        assert trial.status == COMPLETED, (trial.trial_id, trial.reason)
        backbone = trial.config.model.backbone
        pretrained = load_file(str(weights / f"{backbone}.safetensors"))
        tuned = load_file(store.fs_path(f"{trial.checkpoints_by_rank()[0]}/{WEIGHTS_FILE}"))  # a local run
        # Depth 0 froze every backbone tensor: the checkpoint holds the file's values.
        # The head (the only tensors whose shape or values may differ) is left out.
        same = [k for k in pretrained if k in tuned and pretrained[k].shape == tuned[k].shape
                and torch.equal(pretrained[k], tuned[k])]
        assert len(same) >= len(pretrained) - 2, (backbone, len(same), len(pretrained))


def test_a_missing_backbone_file_is_refused_before_ray_starts(digits_halves, tmp_path):
    import ray

    from search.run.driver import run_search

    second, weights = digits_halves
    partial = tmp_path / "partial"
    shutil.copytree(weights, partial)
    (partial / "test_efficientnet.safetensors").unlink()
    space_path = _space(tmp_path)
    with pytest.raises(ConfigError) as err:
        run_search(_search_config(second, partial, tmp_path, space_path))
    assert "test_efficientnet" in str(err.value) and str(partial / "test_efficientnet.safetensors") in str(err.value)
    assert "test_resnet" not in str(err.value).split("\n", 1)[1]  # only the missing one is listed
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()  # no run directory was made either


def test_one_weights_file_for_a_search_over_several_backbones_is_refused(digits_halves, tmp_path):
    second, weights = digits_halves
    raw = small_run_config(second, tmp_path / "runs", model={
        "backbone": "test_resnet", "pretrained": True, "weights_file": str(weights / "test_resnet.safetensors")},
        search={"space": str(_space(tmp_path))})
    from search.run.driver import run_search

    with pytest.raises(ConfigError, match="model.weights_dir"):
        run_search(parse_config(raw))


def test_a_weights_file_of_another_backbone_is_refused_before_ray_starts(digits_halves, tmp_path):
    import ray

    from search.run.driver import run_search
    from trainables.model.backbones import PretrainedWeightsError

    second, weights = digits_halves
    swapped = tmp_path / "swapped"
    shutil.copytree(weights, swapped)
    shutil.copy(weights / "test_resnet.safetensors", swapped / "test_convnext.safetensors")
    with pytest.raises(PretrainedWeightsError) as err:
        run_search(_search_config(second, swapped, tmp_path, _space(tmp_path)))
    assert "for 'test_convnext'" in str(err.value) and "missing" in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()
