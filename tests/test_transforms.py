"""Training augmentation vs deterministic validation preprocessing."""

import numpy as np
import pytest
import torch

from trainables.config import AugmentConfig
from trainables.data.images import ALPHA_RULE
from trainables.data.transforms import (
    create_eval_transform, create_train_transform, eval_transform_from_spec, preprocessing_spec,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _image(h=40, w=80):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_eval_is_deterministic_and_normalised_with_backbone_stats():
    tf = create_eval_transform(32, "center_crop", MEAN, STD)
    a, b = tf(image=_image())["image"], tf(image=_image())["image"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    flat = np.full((10, 10, 3), 255, np.uint8)
    out = tf(image=flat)["image"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)


def test_pad_mode_keeps_the_whole_image_and_pads():
    img = np.full((20, 40, 3), 255, np.uint8)  # 2:1 landscape
    out = create_eval_transform(32, "pad", (0, 0, 0), (1, 1, 1))(image=img)["image"]
    assert out.shape == (3, 32, 32)
    # 40x20 -> 32x16 content centred, 8 rows of zero padding above and below
    assert torch.all(out[:, :8] == 0) and torch.all(out[:, 8:24] == 1) and torch.all(out[:, 24:] == 0)


def test_train_transform_augments():
    tf = create_train_transform(32, AugmentConfig(strength=1.0), MEAN, STD)
    outs = [tf(image=_image())["image"] for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_zero_strength_is_a_plain_resize():
    tf = create_train_transform(32, AugmentConfig(strength=0.0, hflip=False), MEAN, STD)
    a, b = tf(image=_image())["image"], tf(image=_image())["image"]
    assert torch.equal(a, b)


def test_hflip_can_be_turned_off():
    names = [type(t).__name__ for t in create_train_transform(32, AugmentConfig(hflip=False), MEAN, STD)]
    assert "HorizontalFlip" not in names
    names = [type(t).__name__ for t in create_train_transform(32, AugmentConfig(hflip=True), MEAN, STD)]
    assert "HorizontalFlip" in names


def test_unknown_resize_mode():
    with pytest.raises(ValueError, match="center_crop"):
        create_eval_transform(32, "stretch", MEAN, STD)


def test_the_spec_records_the_decoders_alpha_rule_and_refuses_another():
    spec = preprocessing_spec(32, "center_crop", MEAN, STD, 0.875)
    assert spec["alpha"] == ALPHA_RULE == "composite_on_white"
    older = {key: value for key, value in spec.items() if key != "alpha"}  # written before the field
    assert eval_transform_from_spec(older)(image=_image())["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="alpha must be 'composite_on_white' .*got 'drop'"):
        eval_transform_from_spec({**spec, "alpha": "drop"})
