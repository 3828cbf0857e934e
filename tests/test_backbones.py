"""Backbone creation, freezing by unfreeze depth, BatchNorm mode, pretrained loading."""

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainables.model.backbones import (
    PretrainedWeightsError,
    apply_unfreeze_depth,
    create_backbone,
    param_groups,
    set_train_mode,
)
from trainables.config import ModelConfig

# One small model per family in scope. Swin and the production ConvNeXt/ViT sizes are
# shrunk through constructor kwargs so the tests stay fast; the group structure that
# freezing relies on is the same as the full-size models'.
FAMILIES = {
    "resnet": ("resnet10t", {}),
    "efficientnet": ("efficientnet_b0", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "convnext": ("convnext_atto", {}),
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}),
    "deit": ("deit_tiny_patch16_224", {"depth": 2, "img_size": 32}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "img_size": 32, "window_size": 1},
    ),
}
# Top coarse group (below the head) per family: what depth 1 adds to the head.
TOP_GROUP_PREFIX = {
    "resnet": ("layer4.",),
    "efficientnet": ("blocks.6.", "conv_head.", "bn2."),
    "mobilenetv3": ("conv_head.",),
    "convnext": ("head.norm.",),
    "vit": ("blocks.1.", "norm."),
    "deit": ("blocks.1.", "norm."),
    "swin": ("norm.",),
}
HEAD_PREFIX = {
    "resnet": "fc.",
    "efficientnet": "classifier.",
    "mobilenetv3": "classifier.",
    "convnext": "head.fc.",
    "vit": "head.",
    "deit": "head.",
    "swin": "head.fc.",
}


def _create(family):
    name, kwargs = FAMILIES[family]
    return timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_zero_trains_exactly_the_head(family):
    model = _create(family)
    apply_unfreeze_depth(model, 0)
    expected = {n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIX[family])}
    assert expected and _trainable(model) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_one_adds_exactly_the_top_group(family):
    model = _create(family)
    apply_unfreeze_depth(model, 1)
    head = HEAD_PREFIX[family]
    expected = {
        n for n, _ in model.named_parameters()
        if n.startswith(head) or (n.startswith(TOP_GROUP_PREFIX[family]) and not n.startswith(head))
    }
    assert _trainable(model) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_all_trains_everything_and_max_depth_equals_all(family):
    model = _create(family)
    apply_unfreeze_depth(model, "all")
    everything = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == everything
    groups = apply_unfreeze_depth(model, 0)
    apply_unfreeze_depth(model, len(groups.groups))
    assert _trainable(model) == everything


def test_depth_beyond_groups_names_the_group_count():
    model = _create("resnet")  # stem + layer1..4 = 5 groups
    with pytest.raises(ValueError, match=r"between 0 and 5 .*'resnet10t' \(5 parameter groups\), got 6"):
        apply_unfreeze_depth(model, 6)


def test_groups_are_disjoint_and_cover_the_model():
    model = _create("convnext")
    g = param_groups(model)
    names = [n for group in g.groups for n in group] + list(g.head)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))


def test_frozen_batchnorm_stays_in_eval_mode():
    model = _create("resnet")
    apply_unfreeze_depth(model, 1)
    set_train_mode(model)
    assert model.training
    assert not model.bn1.training  # stem: frozen
    assert not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training  # top group: trains
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


def test_pretrained_weights_round_trip_through_a_local_file(tmp_path):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    torch.nn.init.normal_(source.layer4[0].conv1.weight)  # a value random init would not repeat
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    model = create_backbone(ModelConfig(backbone="test_resnet", pretrained=True, weights_file=path), 7)
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert model.fc.out_features == 7  # the 1000-class head was replaced, not loaded


def test_pretrained_from_a_file_of_another_architecture_fails_clearly(tmp_path):
    other = timm.create_model("test_vit", pretrained=False)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(PretrainedWeightsError, match="could not load weights for 'test_resnet'"):
        create_backbone(ModelConfig(backbone="test_resnet", pretrained=True, weights_file=path), 3)


def test_pretrained_without_file_or_network_never_falls_back_to_random(tmp_path):
    # A fresh interpreter, because huggingface_hub reads HF_HUB_OFFLINE at import time;
    # offline mode makes the missing network fail in seconds instead of retrying.
    code = (
        "from trainables.model.backbones import create_backbone\n"
        "from trainables.config import ModelConfig\n"
        "create_backbone(ModelConfig(backbone='test_resnet', pretrained=True), 3)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "PretrainedWeightsError" in proc.stderr
    assert "model.weights_dir" in proc.stderr


def test_a_pickle_that_would_run_code_is_refused_without_torchs_unsafe_hint(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)  # what unpickling would run

    path = tmp_path / "test_resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(PretrainedWeightsError) as err:
        create_backbone(ModelConfig(backbone="test_resnet", pretrained=True, weights_file=path), 3)
    assert str(err.value) == (
        f"weights file '{path}' holds pickled Python objects besides tensors (posix.mkdir), and tunecv never "
        "unpickles them: it loads only .safetensors files, or .pth/.pt/.bin files of plain tensors. If you trust "
        "the file, convert it yourself: load it in Python, save its state dict with "
        "safetensors.torch.save_file(state_dict, 'test_resnet.safetensors'), and give that file instead.")
    assert "weights_only" not in str(err.value)  # torch's hint: tunecv has no such option, by design
    assert not marker.exists()


def test_unknown_backbone_suggests_close_timm_names():
    with pytest.raises(ValueError, match="Closest timm names: .*efficientnet_b2"):
        ModelConfig(backbone="efficentnet_b2")


def test_a_tensor_of_the_wrong_shape_is_named_once_with_both_shapes(tmp_path):
    from trainables.model.backbones import check_weights_file

    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", pretrained=False).state_dict().items()}
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "test_resnet.safetensors"
    save_file(state, str(path))
    for check in (lambda: check_weights_file("test_resnet", path),  # before Ray: the header only
                  lambda: create_backbone(ModelConfig(backbone="test_resnet", pretrained=True, weights_file=path), 3)):
        with pytest.raises(PretrainedWeightsError) as err:
            check()
        message = str(err.value)
        assert "1 of the wrong shape" in message and "missing" not in message, message
        assert message.count("layer1.0.conv1.weight") == 1
        assert "expected (" in message and "found (3, 3, 1, 1)" in message
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(b"\x00\xff" * 64)
    with pytest.raises(PretrainedWeightsError, match="could not read weights file .* as safetensors"):
        check_weights_file("test_resnet", noise)
