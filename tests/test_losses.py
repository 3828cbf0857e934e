"""Losses against values computed by hand."""

import math

import pytest
import torch

from trainables.config import LossConfig
from trainables.training.losses import FocalLoss, balanced_class_weights, create_loss

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
TARGET = torch.tensor([0, 2])
# softmax of row 0: e^2 / (e^2 + 2) = 0.786986; row 1 target 0: 1 / (e + 2) = 0.211942
P0, P1 = math.exp(2) / (math.exp(2) + 2), 1 / (math.e + 2)


def test_cross_entropy_by_hand():
    expected = -(math.log(P0) + math.log(P1)) / 2
    loss = create_loss(LossConfig(type="ce"), [1, 1, 1])(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_by_hand():
    eps = 0.1
    logp = torch.log_softmax(LOGITS, dim=1)
    # target distribution: (1 - eps) on the label + eps / C everywhere
    per_sample = [
        -((1 - eps) * logp[i, t] + eps / 3 * logp[i].sum()) for i, t in enumerate(TARGET.tolist())
    ]
    expected = float(sum(per_sample) / 2)
    loss = create_loss(LossConfig(type="label_smoothing", smoothing=eps), [1, 1, 1])(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_balanced_weights_match_sklearn_rule():
    # 100 samples, 2 classes: 100 / (2 * 90) and 100 / (2 * 10)
    w = balanced_class_weights([90, 10])
    assert w.tolist() == pytest.approx([100 / 180, 5.0], rel=1e-6)


def test_weighted_ce_by_hand():
    counts = [6, 3, 1]  # weights 10/18, 10/9, 10/3
    w = [10 / 18, 10 / 9, 10 / 3]
    # torch's weighted mean: sum(w_y * nll) / sum(w_y)
    expected = (w[0] * -math.log(P0) + w[2] * -math.log(P1)) / (w[0] + w[2])
    loss = create_loss(LossConfig(type="weighted_ce"), counts)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_by_hand():
    g = 2.0
    expected = (-((1 - P0) ** g) * math.log(P0) - ((1 - P1) ** g) * math.log(P1)) / 2
    loss = create_loss(LossConfig(type="focal", gamma=g), [1, 1, 1])(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_gamma_zero_is_cross_entropy():
    ce = torch.nn.functional.cross_entropy(LOGITS, TARGET)
    assert FocalLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_alpha_weights_each_sample():
    alpha = [0.5, 1.0, 2.0]
    expected = (
        -0.5 * (1 - P0) ** 2 * math.log(P0) - 2.0 * (1 - P1) ** 2 * math.log(P1)
    ) / 2
    loss = create_loss(LossConfig(type="focal", alpha=alpha), [1, 1, 1])(LOGITS, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_alpha_length_must_match_classes():
    with pytest.raises(ValueError, match="3 classes"):
        create_loss(LossConfig(type="focal", alpha=[1.0, 2.0]), [1, 1, 1])


def test_class_without_samples_is_an_error():
    with pytest.raises(ValueError, match=r"\[1\]"):
        create_loss(LossConfig(type="weighted_ce"), [4, 0, 2])


def test_unknown_loss_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'focal'"):
        LossConfig(type="focall")
