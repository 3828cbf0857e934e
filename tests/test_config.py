"""Run-file validation: every bad field is named with its fix, before any compute."""

import pytest

from search.config import ConfigError, load_config, parse_config
from tests.conftest import small_run_config


def _raw(tmp_path, **sections):
    (tmp_path / "data").mkdir(exist_ok=True)
    return small_run_config(tmp_path / "data", tmp_path / "runs", **sections)


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def test_valid_config_parses_to_frozen_objects(tmp_path):
    cfg = parse_config(_raw(tmp_path))
    assert cfg.model.backbone == "test_resnet"
    assert cfg.trial().optim.epochs == 2
    with pytest.raises(Exception):
        cfg.optim.epochs = 5  # frozen


def test_unknown_key_is_named(tmp_path):
    msg = _error(_raw(tmp_path, optim={"lr_heda": 1e-3}))
    assert "optim.lr_heda: unknown key" in msg


def test_unknown_top_level_section_is_named(tmp_path):
    raw = _raw(tmp_path)
    raw["optimiser"] = {}
    assert "optimiser: unknown key" in _error(raw)


def test_wrong_type_is_named(tmp_path):
    msg = _error(_raw(tmp_path, optim={"epochs": "ten"}))
    assert "optim.epochs" in msg and "'ten'" in msg


def test_out_of_range_value_is_named(tmp_path):
    msg = _error(_raw(tmp_path, data={"val_fraction": 0.5}))
    assert "data.val_fraction" in msg and "0.3" in msg


def test_every_problem_is_listed_at_once(tmp_path):
    msg = _error(_raw(tmp_path, optim={"epochs": 0, "lr_head": -1.0}))
    assert "optim.epochs" in msg and "optim.lr_head" in msg


def test_unknown_backbone_suggests_timm_names(tmp_path):
    msg = _error(_raw(tmp_path, model={"backbone": "convnext_tny"}))
    assert "model.backbone" in msg and "convnext_tiny" in msg


def test_unknown_loss_is_named(tmp_path):
    msg = _error(_raw(tmp_path, loss={"type": "hinge"}))
    assert "loss.type" in msg and "'focal'" in msg


def test_warmup_longer_than_training_is_inverted(tmp_path):
    msg = _error(_raw(tmp_path, optim={"epochs": 2, "warmup_epochs": 3}))
    assert "warmup_epochs" in msg and "less than epochs" in msg


def test_negative_unfreeze_depth(tmp_path):
    assert "model.unfreeze_depth" in _error(_raw(tmp_path, model={"unfreeze_depth": -1}))


def test_a_frozen_group_without_pretrained_weights_is_refused_with_the_fix(tmp_path):
    msg = _error(_raw(tmp_path, model={"backbone": "resnet18", "pretrained": False, "unfreeze_depth": 2}))
    assert "unfreeze_depth 2 freezes groups of 'resnet18'" in msg and "unfreeze_depth: all" in msg


def test_weights_file_without_pretrained(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    msg = _error(_raw(tmp_path, model={"pretrained": False, "weights_file": str(weights)}))
    assert "pretrained is false" in msg
    msg = _error(_raw(tmp_path, model={"pretrained": False, "weights_dir": str(tmp_path)}))
    assert "weights_dir is set but pretrained is false" in msg


def test_one_weights_file_and_a_weights_dir_are_refused_together(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    msg = _error(_raw(tmp_path, model={"pretrained": True, "weights_file": str(weights), "weights_dir": str(tmp_path)}))
    assert "weights_file and weights_dir are both set" in msg


def test_missing_paths_are_errors(tmp_path):
    raw = _raw(tmp_path, model={"pretrained": True, "weights_file": str(tmp_path / "nope.safetensors")})
    raw["data"]["root"] = str(tmp_path / "missing")
    msg = _error(raw)
    assert "data.root" in msg and "model.weights_file" in msg
    msg = _error(_raw(tmp_path, model={"pretrained": True, "weights_dir": str(tmp_path / "no_weights")}))
    assert "model.weights_dir: directory" in msg


def test_fp16_on_cpu_is_refused(tmp_path):
    assert "use_gpu" in _error(_raw(tmp_path, optim={"precision": "fp16"}))


def test_yaml_file_with_overrides(tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path)))
    cfg = load_config(path, ["optim.epochs=7", "loss.type=focal"])
    assert cfg.optim.epochs == 7 and cfg.loss.type == "focal"


def test_malformed_override_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("{}")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["epochs"])


def test_a_config_that_is_not_a_yaml_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give the run's YAML file"):
        load_config(tmp_path)
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(noise)


def test_paths_that_are_files_or_unwritable_are_named(tmp_path):
    import os

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    raw = _raw(tmp_path)
    raw["data"]["root"], raw["output_dir"] = str(a_file), str(a_file)
    msg = _error(raw)
    assert f"data.root: directory '{a_file}' is a file, not a directory" in msg
    assert f"output_dir: '{a_file}' is a file" in msg
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        raw = _raw(tmp_path)
        raw["output_dir"] = str(locked / "runs")
        assert "cannot be created or written" in _error(raw)


def test_the_output_dir_check_writes_a_file_and_leaves_nothing(tmp_path):
    raw = _raw(tmp_path)
    raw["output_dir"] = str(tmp_path / "new" / "runs")
    parse_config(raw)  # the test file goes where the first missing folder would be made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no probe left, output_dir not made
    raw["output_dir"] = str(tmp_path / "data")
    parse_config(raw)
    assert list((tmp_path / "data").iterdir()) == []


def test_a_database_url_whose_driver_is_not_installed_is_refused_with_the_fix(tmp_path):
    message = _error(_raw(tmp_path, search={"storage": "mysql://tunecv@127.0.0.1/studies"}))
    assert "search.storage: the mysql driver is not installed" in message and "pip install pymysql" in message
    cfg = parse_config(_raw(tmp_path, search={"storage": "postgresql://tunecv@127.0.0.1/studies"}))
    assert cfg.search.storage.startswith("postgresql://")  # psycopg comes with the test extra
