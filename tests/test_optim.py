"""Discriminative parameter groups and the warmup + cosine schedule."""

import pytest
import timm

from trainables.model.backbones import apply_unfreeze_depth, param_groups
from trainables.config import OptimConfig
from trainables.training.optim import create_optimizer, create_scheduler, warmup_cosine


def _model(depth):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    apply_unfreeze_depth(model, depth)
    return model


def test_head_and_base_get_their_own_lr_and_frozen_params_are_left_out():
    model = _model(1)
    cfg = OptimConfig(lr_head=1e-2, lr_base=1e-4, weight_decay=0.1)
    opt = create_optimizer(model, param_groups(model).head, cfg)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable
    assert len(trainable) < len(list(model.parameters()))
    for g in opt.param_groups:
        assert g["lr"] == (1e-2 if g["role"] == "head" else 1e-4)
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.ndim > 1 else 0.0)
    assert {g["role"] for g in opt.param_groups} == {"head", "base"}


def test_head_only_has_no_base_group():
    model = _model(0)
    opt = create_optimizer(model, param_groups(model).head, OptimConfig())
    assert {g["role"] for g in opt.param_groups} == {"head"}


def test_warmup_then_cosine_to_floor():
    f = warmup_cosine(total_steps=30, warmup_steps=3, min_lr_ratio=0.01)
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)
    assert f(29) == pytest.approx(0.01)
    values = [f(s) for s in range(3, 30)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_scheduler_steps_scale_both_groups():
    model = _model("all")
    cfg = OptimConfig(epochs=2, warmup_epochs=0.5, lr_head=1e-2, lr_base=1e-3, min_lr_ratio=0.0)
    opt = create_optimizer(model, param_groups(model).head, cfg)
    sched = create_scheduler(opt, cfg, steps_per_epoch=10)  # 20 steps, 5 warmup
    lrs = []
    for _ in range(20):
        lrs.append({g["role"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert lrs[0]["head"] == pytest.approx(1e-2 / 5)
    assert lrs[4]["head"] == pytest.approx(1e-2)
    assert lrs[4]["base"] == pytest.approx(1e-3)
    assert lrs[19]["head"] == pytest.approx(0.0, abs=1e-12)
