"""Search spaces: shipped files validate, suggestions round-trip to trial configs,
bad files fail before any compute."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from search.space.model import SearchSpace, SpaceError, unfreeze_depth_param
from search.space.catalog import SPACES_DIR, TIERS, load_space, resolve_space_name
from trainables.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
SHIPPED = ("demo", "tier_lt1k", "tier_1k_10k", "tier_10k_100k", "tier_gt100k")
LOSS_BRANCH_PARAMS = {
    "ce": {}, "label_smoothing": {"smoothing": 0.1}, "weighted_ce": {}, "focal": {"gamma": 2.0},
}


def small_space(**changes) -> dict:
    """A raw space using every feature; ``changes`` replace top-level keys (None removes)."""
    raw = {
        "description": "test space",
        "needs_pretrained": True,  # it freezes groups
        "backbones": {
            "resnet10t": {"unfreeze_depth": [2, "all"]},
            "mobilenetv3_small_050": {"unfreeze_depth": [0, 8]},
        },
        "lr_head": {"low": 1.0e-3, "high": 1.0e-2},
        "lr_base": {"ratio": {"low": 0.1, "high": 1.0}},
        "losses": {
            "ce": {},
            "label_smoothing": {"smoothing": {"low": 0.05, "high": 0.2}},
            "weighted_ce": {},
            "focal": {"gamma": {"low": 1.0, "high": 3.0}},
        },
        "batch_size": [32, 64],
        "weight_decay": {"low": 1.0e-4, "high": 1.0e-1},
        "augment_strength": {"low": 0.0, "high": 1.0},
    }
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


def write_space(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_config(overrides: dict, data_root: Path, pretrained: bool = True) -> TrialConfig:
    """The overrides merged section by section into a minimal run's trial settings."""
    merged = {"data": {"root": str(data_root)}, "model": {"pretrained": pretrained}}
    for section, fields in overrides.items():
        merged[section] = {**merged.get(section, {}), **fields}
    return TrialConfig.model_validate(merged)


def tpe_sampler() -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, constant_liar=True)


def test_spaces_folder_is_not_a_python_package_and_ships_every_tier():
    assert not (SPACES_DIR / "__init__.py").exists()
    assert {name for _, name in TIERS} <= set(SHIPPED)
    assert all((SPACES_DIR / f"{name}.yaml").is_file() for name in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_shipped_space_validates_and_its_warm_start_builds_a_trial_config(name, tmp_path):
    space = load_space(SPACES_DIR / f"{name}.yaml", check_depths=True)
    assert space.description
    points = space.warm_start_points()
    assert points, f"{name} should warm-start from the guide's recipe"

    study = optuna.create_study(sampler=tpe_sampler(), direction="maximize")
    study.enqueue_trial(points[0])
    study.optimize(lambda trial: space.define_by_run(trial) or 0.0, n_trials=1)
    params = study.trials[0].params
    assert params == points[0]
    cfg = trial_config(space.to_overrides(params), tmp_path, pretrained=space.needs_pretrained)
    assert cfg.model.backbone == points[0]["backbone"]
    assert cfg.loss.type == points[0]["loss"]


@pytest.mark.parametrize("loss", list(LOSS_BRANCH_PARAMS))
def test_fixed_trial_ratio_form_suggests_exactly_its_branch(loss, tmp_path):
    space = SearchSpace.model_validate(small_space())
    params = {
        "backbone": "resnet10t", unfreeze_depth_param("resnet10t"): 2, "lr_head": 4.0e-3,
        "lr_base_ratio": 0.5, "loss": loss, **LOSS_BRANCH_PARAMS[loss],
        "batch_size": 32, "weight_decay": 1.0e-3, "augment_strength": 0.25,
    }
    # Offer every branch's values: the trial must take only the ones its branch uses.
    trial = optuna.trial.FixedTrial({**params, "smoothing": 0.1, "gamma": 2.0,
                                     unfreeze_depth_param("mobilenetv3_small_050"): 0})
    space.define_by_run(trial)
    assert trial.params == params

    overrides = space.to_overrides(trial.params)
    assert overrides == {
        "model": {"backbone": "resnet10t", "unfreeze_depth": 2},
        "optim": {"lr_head": 4.0e-3, "lr_base": 2.0e-3, "batch_size": 32, "weight_decay": 1.0e-3},
        "loss": {"type": loss, **LOSS_BRANCH_PARAMS[loss]},
        "augment": {"strength": 0.25},
    }
    cfg = trial_config(overrides, tmp_path)
    assert (cfg.model.unfreeze_depth, cfg.optim.lr_base, cfg.loss.type) == (2, 2.0e-3, loss)


def test_fixed_trial_absolute_lr_base_without_optional_dimensions(tmp_path):
    raw = small_space(lr_base={"low": 1.0e-5, "high": 1.0e-3}, batch_size=None,
                      weight_decay=None, augment_strength=None)
    space = SearchSpace.model_validate(raw)
    params = {"backbone": "mobilenetv3_small_050", unfreeze_depth_param("mobilenetv3_small_050"): 8,
              "lr_head": 1.0e-3, "lr_base": 1.0e-4, "loss": "focal", "gamma": 1.5}
    trial = optuna.trial.FixedTrial(params)
    space.define_by_run(trial)
    assert trial.params == params

    overrides = space.to_overrides(params)
    assert overrides == {
        "model": {"backbone": "mobilenetv3_small_050", "unfreeze_depth": 8},
        "optim": {"lr_head": 1.0e-3, "lr_base": 1.0e-4},
        "loss": {"type": "focal", "gamma": 1.5},
    }
    cfg = trial_config(overrides, tmp_path)
    assert cfg.optim.batch_size == 64 and cfg.augment.strength == 1.0  # run defaults kept


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_tpe_study_trials_convert_to_valid_trial_configs_within_ranges(tmp_path):
    raw = small_space()
    space = SearchSpace.model_validate(raw)
    study = optuna.create_study(sampler=tpe_sampler(), direction="maximize")
    # A score that prefers resnet10t, focal and mid learning rates gives TPE a landscape.
    study.optimize(
        lambda trial: space.define_by_run(trial) or (
            (trial.params["backbone"] == "resnet10t") + (trial.params["loss"] == "focal")
            - abs(math.log10(trial.params["lr_head"]) + 2.5)
        ),
        n_trials=20,
    )
    seen_backbones, seen_losses = set(), set()
    for trial in study.trials:
        cfg = trial_config(space.to_overrides(trial.params), tmp_path)
        seen_backbones.add(cfg.model.backbone)
        seen_losses.add(cfg.loss.type)
        depths = raw["backbones"][cfg.model.backbone]["unfreeze_depth"]
        assert cfg.model.unfreeze_depth in depths
        assert 1.0e-3 <= cfg.optim.lr_head <= 1.0e-2
        assert 0.1 - 1e-12 <= cfg.optim.lr_base / cfg.optim.lr_head <= 1.0 + 1e-12
        assert cfg.optim.batch_size in (32, 64)
        assert 1.0e-4 <= cfg.optim.weight_decay <= 1.0e-1
        assert 0.0 <= cfg.augment.strength <= 1.0
        assert ("smoothing" in trial.params) == (cfg.loss.type == "label_smoothing")
        assert ("gamma" in trial.params) == (cfg.loss.type == "focal")
        depth_params = {unfreeze_depth_param(b) for b in raw["backbones"]} & trial.params.keys()
        assert depth_params == {unfreeze_depth_param(cfg.model.backbone)}
    assert len(seen_backbones) == 2 and len(seen_losses) >= 3


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_warm_start_points_are_enqueued_exactly():
    recipe = {"backbone": "mobilenetv3_small_050", "unfreeze_depth": 0, "lr_head": 2.0e-3,
              "lr_base_ratio": 0.2, "loss": "label_smoothing", "smoothing": 0.15,
              "batch_size": 64, "weight_decay": 0.01, "augment_strength": 0.5}
    space = SearchSpace.model_validate(small_space(warm_start=[recipe]))
    (point,) = space.warm_start_points()
    expected = {**recipe, unfreeze_depth_param("mobilenetv3_small_050"): 0}
    del expected["unfreeze_depth"]
    assert point == expected

    study = optuna.create_study(sampler=tpe_sampler())
    study.enqueue_trial(point)
    study.optimize(lambda trial: space.define_by_run(trial) or 0.0, n_trials=2)
    assert study.trials[0].params == expected
    overrides = space.to_overrides(study.trials[0].params)
    assert overrides["loss"] == {"type": "label_smoothing", "smoothing": 0.15}


def test_the_searcher_suggests_the_warm_start_first_under_its_run_level_id():
    from search.run.searcher import StudySearcher  # the driver's exact wiring, no Ray cluster
    from search.study import TRIAL_ID_KEY, StudyHandle
    from search.run.trial import searched_params

    space = load_space(SPACES_DIR / "demo.yaml")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for point in space.warm_start_points():
        study.enqueue_trial(point)
    searcher = StudySearcher(StudyHandle(study), space)
    first, second = searcher.suggest("tune_a"), searcher.suggest("tune_b")
    assert (first[TRIAL_ID_KEY], second[TRIAL_ID_KEY]) == ("t0000", "t0001")
    first, second = searched_params(first), searched_params(second)
    assert first == space.warm_start_points()[0]
    assert space.to_overrides(first)["optim"] == {"lr_head": 3.0e-3, "lr_base": 3.0e-3}
    assert space.to_overrides(second)["model"]["backbone"] in space.backbone_names()


def bad(case_id: str, changes: dict, *expected: str):
    return pytest.param(changes, expected, id=case_id)


BAD_SPACES = [
    bad("unknown-backbone", {"backbones": {"resnet5O": {"unfreeze_depth": ["all"]}}},
        "backbones.resnet5O: unknown backbone", "resnet50"),
    bad("empty-backbones", {"backbones": {}}, "backbones: empty"),
    bad("low-above-high", {"lr_head": {"low": 1.0e-2, "high": 1.0e-3}},
        "lr_head: low (0.01) is greater than high (0.001)"),
    bad("log-low-zero", {"weight_decay": {"low": 0.0, "high": 0.1}},
        "weight_decay: a log-uniform range needs low > 0"),
    bad("unknown-loss", {"losses": {"ce": {}, "focall": {}}},
        "losses.focall: unknown loss", "Did you mean 'focal'"),
    bad("gamma-under-ce", {"losses": {"ce": {"gamma": {"low": 1.0, "high": 2.0}}}},
        "losses.ce.gamma", "move it under losses.focal"),
    bad("empty-losses", {"losses": {}}, "losses: empty"),
    bad("depth-beyond-groups", {"backbones": {"resnet10t": {"unfreeze_depth": [6, "all"]}}},
        "backbones.resnet10t.unfreeze_depth: 6 exceeds the 5 coarse parameter groups of "
        "'resnet10t' (allowed 0..5 or 'all')"),
    bad("negative-depth", {"backbones": {"resnet10t": {"unfreeze_depth": [-1]}}},
        "backbones.resnet10t.unfreeze_depth[0]: -1 is not an unfreeze depth"),
    bad("no-depths", {"backbones": {"resnet10t": {"unfreeze_depth": []}}},
        "backbones.resnet10t.unfreeze_depth: empty list"),
    bad("unknown-top-key", {"weight_decy": {"low": 1.0e-3, "high": 1.0e-2}},
        "weight_decy: unknown key", "did you mean 'weight_decay'"),
    bad("unknown-nested-key", {"lr_base": {"ratio": {"low": 0.1, "hgh": 1.0}}},
        "lr_base.ratio.hgh: unknown key"),
    bad("missing-lr-head", {"lr_head": None}, "lr_head: required but missing"),
    bad("beyond-trial-limit", {"losses": {"label_smoothing": {"smoothing": {"low": 0.1, "high": 1.5}}}},
        "losses.label_smoothing.smoothing: 1.5 is outside what a trial accepts"),
    bad("warm-backbone", {"warm_start": [{"backbone": "resnet50", "loss": "ce"}]},
        "warm_start[0].backbone: 'resnet50' is not in this space"),
    bad("warm-depth", {"warm_start": [{"backbone": "resnet10t", "unfreeze_depth": 3, "loss": "ce"}]},
        "warm_start[0].unfreeze_depth: 3 is not one of [2, 'all']"),
    bad("warm-range", {"warm_start": [{"backbone": "resnet10t", "loss": "ce", "lr_head": 0.5}]},
        "warm_start[0].lr_head: 0.5 is outside 0.001..0.01"),
    bad("warm-wrong-loss-param", {"warm_start": [{"backbone": "resnet10t", "loss": "ce", "gamma": 2.0}]},
        "warm_start[0].gamma: not a parameter of this space"),
    bad("warm-incomplete", {"warm_start": [{"backbone": "resnet10t", "loss": "ce"}]},
        "warm_start[0].unfreeze_depth: missing; this space searches it (one of [2, 'all'])",
        "warm_start[0].weight_decay: missing; this space searches it (0.0001..0.1)"),
    bad("warm-wrong-lr-form", {"warm_start": [{"backbone": "resnet10t", "loss": "ce", "lr_base": 1.0e-3}]},
        "warm_start[0].lr_base: not a parameter", "lr_base_ratio"),
]


@pytest.mark.parametrize("changes, expected", BAD_SPACES)
def test_bad_space_raises_naming_the_field(changes, expected, tmp_path):
    with pytest.raises(SpaceError) as info:
        load_space(write_space(tmp_path, small_space(**changes)))
    for text in expected:
        assert text in str(info.value)


def test_every_problem_is_listed_at_once(tmp_path):
    raw = small_space(backbones={"resnt10t": {"unfreeze_depth": ["all"]}},
                      losses={"cee": {}}, lr_head={"low": 1.0e-2, "high": 1.0e-3})
    with pytest.raises(SpaceError) as info:
        load_space(write_space(tmp_path, raw))
    message = str(info.value)
    assert all(path in message for path in ("backbones.resnt10t", "losses.cee", "lr_head"))


def test_depth_check_can_be_skipped(tmp_path):
    raw = small_space(backbones={"resnet10t": {"unfreeze_depth": [6]}})
    space = load_space(write_space(tmp_path, raw), check_depths=False)
    assert space.backbones["resnet10t"].unfreeze_depth == (6,)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "backbones: [unclosed\n"])
def test_non_mapping_or_broken_yaml_is_a_space_error(text, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match="bad.yaml"):
        load_space(path)


def test_to_overrides_rejects_params_from_another_branch():
    space = SearchSpace.model_validate(small_space())
    params = {"backbone": "resnet10t", unfreeze_depth_param("resnet10t"): "all", "lr_head": 2.0e-3,
              "lr_base_ratio": 0.5, "loss": "ce", "gamma": 2.0, "batch_size": 32,
              "weight_decay": 1.0e-3}
    with pytest.raises(SpaceError) as info:
        space.to_overrides(params)
    assert "params.gamma: not a parameter" in str(info.value)
    assert "params.augment_strength: missing" in str(info.value)
    with pytest.raises(SpaceError, match="backbone 'resnet50'"):
        space.to_overrides({**params, "backbone": "resnet50"})


def test_resolve_named_and_path_spaces(tmp_path):
    path, message = resolve_space_name("demo")
    assert path == SPACES_DIR / "demo.yaml" and "demo" in message
    own = write_space(tmp_path, small_space())
    assert resolve_space_name(str(own))[0] == own


@pytest.mark.parametrize(
    "images, tier, shown",
    [(500, "tier_lt1k", "500"), (999, "tier_lt1k", "999"), (1_000, "tier_1k_10k", "1,000"),
     (5_000, "tier_1k_10k", "5,000"), (50_000, "tier_10k_100k", "50,000"),
     (500_000, "tier_gt100k", "500,000")],
)
def test_auto_picks_the_tier_by_training_images(images, tier, shown):
    path, message = resolve_space_name("auto", num_train_images=images)
    assert path == SPACES_DIR / f"{tier}.yaml" and path.is_file()
    assert message.startswith(f"--space auto: {shown} training images -> {tier} (")


def test_resolve_errors_say_what_is_available(tmp_path):
    with pytest.raises(SpaceError) as info:
        resolve_space_name("tier_huge")
    assert all(name in str(info.value) for name in SHIPPED)
    with pytest.raises(SpaceError, match="number of training images"):
        resolve_space_name("auto")
    with pytest.raises(SpaceError, match="no such file"):
        resolve_space_name(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("images", [10, 999, 5_000, 50_000, 500_000])
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_auto_without_pretrained_weights_never_proposes_a_frozen_random_backbone(images, tmp_path):
    path, message = resolve_space_name("auto", num_train_images=images, pretrained=False)
    assert path.stem.startswith("scratch_") and "no pretrained weights" in message
    space = load_space(path)
    assert not space.needs_pretrained
    assert all(choice.unfreeze_depth == ("all",) for choice in space.backbones.values())
    # ...and every configuration it can suggest is a valid from-scratch trial.
    study = optuna.create_study(sampler=tpe_sampler(), direction="maximize")
    study.optimize(lambda trial: space.define_by_run(trial) or 0.0, n_trials=8)
    for trial in study.trials:
        cfg = trial_config(space.to_overrides(trial.params), tmp_path, pretrained=False)
        assert cfg.model.unfreeze_depth == "all"


def test_a_space_without_pretrained_weights_may_not_freeze_a_group(tmp_path):
    raw = small_space(needs_pretrained=False)
    with pytest.raises(SpaceError) as info:
        load_space(write_space(tmp_path, raw))
    assert "backbones.resnet10t.unfreeze_depth: [2, 'all'] freezes groups of random weights" in str(info.value)
    assert "backbones.mobilenetv3_small_050.unfreeze_depth" in str(info.value)
    with pytest.raises(SpaceError, match="needs_pretrained: required but missing"):
        load_space(write_space(tmp_path, small_space(needs_pretrained=None)))


def test_a_fine_tuning_space_is_refused_for_a_run_without_pretrained_weights(tmp_path):
    from search.config import ConfigError, parse_config
    from search.run.driver import check_space
    from tests.conftest import small_run_config

    cfg = parse_config(small_run_config(tmp_path, tmp_path / "runs"))  # pretrained: false
    text = (SPACES_DIR / "tier_lt1k.yaml").read_text()
    with pytest.raises(ConfigError, match="model.pretrained is false.*--space auto"):
        check_space(cfg, text, "tier_lt1k")
    assert check_space(cfg, (SPACES_DIR / "scratch_lt10k.yaml").read_text(), "scratch_lt10k").backbones
