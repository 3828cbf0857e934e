"""Checkpoint format: safetensors + JSON, never a pickle."""

import pickle

import pytest
import timm
import torch

from trainables.model.checkpoint import META_FILE, WEIGHTS_FILE, load_model, read_meta, save_checkpoint


def _meta():
    return {"class_names": ["a", "b", "c"], "backbone": "test_resnet", "preprocessing": {"image_size": 32}}


def test_round_trip_restores_identical_outputs(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    save_checkpoint(tmp_path, model, _meta())
    loaded, meta = load_model(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert meta["class_names"] == ["a", "b", "c"]


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    save_checkpoint(tmp_path, timm.create_model("test_resnet", pretrained=False, num_classes=3), _meta())
    with open(tmp_path / WEIGHTS_FILE, "rb") as f:
        with pytest.raises(pickle.UnpicklingError):
            pickle.load(f)


def test_meta_without_required_keys_is_refused(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match="class_names"):
        save_checkpoint(tmp_path, model, {"backbone": "test_resnet", "preprocessing": {}})


def test_unknown_format_version_is_refused(tmp_path):
    save_checkpoint(tmp_path, timm.create_model("test_resnet", pretrained=False, num_classes=3), _meta())
    (tmp_path / META_FILE).write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        read_meta(tmp_path)
