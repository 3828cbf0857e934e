"""Albumentations pipelines for training and validation.

Owns the augmentation recipe and the deterministic validation resize, both normalised
with the backbone's own mean/std from timm's pretrained config. Validation never gets
training augmentation: it is resize + center crop (timm's crop_pct) or
pad-and-resize that keeps the aspect ratio. Decoding (modes, transparency, EXIF) is
``trainables.data.images``'s; the preprocessing spec records its rule for servers.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from trainables.config import AugmentConfig
from trainables.data.images import ALPHA_RULE


def create_train_transform(
    image_size: int,
    aug: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int | None = None,
) -> A.Compose:
    """RandomResizedCrop, optional flip, colour jitter, coarse dropout, normalise.

    ``aug.strength`` scales every magnitude: at 0 this is a plain full-frame resize.
    ``seed`` makes the augmentation sequence reproducible (loader workers reseed it).
    """
    s = aug.strength
    scale_min = min(1.0, max(0.05, 1.0 - (1.0 - aug.scale_min) * s))
    jitter = min(0.9, aug.color_jitter * s)
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(image_size, image_size), scale=(scale_min, 1.0)),
    ]
    if aug.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if jitter > 0:
        steps.append(
            A.ColorJitter(
                brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.5, jitter / 2), p=0.8
            )
        )
    dropout_p = min(1.0, aug.coarse_dropout_p * s)
    if dropout_p > 0:
        # Holes of 5-12.5 % of the side: big enough to force context, small enough
        # (at most 8 of them) not to erase a small object outright.
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 8),
                hole_height_range=(0.05, 0.125),
                hole_width_range=(0.05, 0.125),
                p=dropout_p,
            )
        )
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(steps, seed=seed)


def create_eval_transform(
    image_size: int,
    resize_mode: str,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
) -> A.Compose:
    """Deterministic validation/inference preprocessing.

    ``center_crop``: shorter side to ``image_size / crop_pct`` then a centre crop, as
    timm evaluates (64 px at crop_pct 0.875 -> resize to 73, crop 64).
    ``pad``: longer side to ``image_size``, zero-pad to a square; nothing is cut off.
    """
    if resize_mode == "center_crop":
        resize = [
            A.SmallestMaxSize(max_size=int(image_size / crop_pct)),
            A.CenterCrop(height=image_size, width=image_size),
        ]
    elif resize_mode == "pad":
        resize = [
            A.LongestMaxSize(max_size=image_size),
            A.PadIfNeeded(
                min_height=image_size, min_width=image_size, border_mode=cv2.BORDER_CONSTANT, fill=0
            ),
        ]
    else:
        raise ValueError(f"resize_mode must be 'center_crop' or 'pad', got {resize_mode!r}.")
    return A.Compose([*resize, A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


def eval_transform_from_spec(spec: dict) -> A.Compose:
    """``create_eval_transform`` rebuilt from a checkpoint's ``preprocessing_spec``.

    The transform takes what ``trainables.data.images.decode_rgb`` returns, so the spec's
    ``alpha`` rule must be the decoder's; a spec without one predates the field and was
    decoded the same way.

    Raises:
        KeyError: A field of the spec is missing.
        ValueError: The spec asks for another alpha rule or resize mode.
    """
    if spec.get("alpha", ALPHA_RULE) != ALPHA_RULE:
        raise ValueError(
            f"preprocessing alpha must be {ALPHA_RULE!r} (how tunecv decodes every image), "
            f"got {spec['alpha']!r}; restore the value the checkpoint was written with."
        )
    return create_eval_transform(
        spec["image_size"], spec["resize_mode"], spec["mean"], spec["std"], spec["crop_pct"]
    )


def preprocessing_spec(
    image_size: int, resize_mode: str, mean: Sequence[float], std: Sequence[float], crop_pct: float
) -> dict:
    """What a server needs to reproduce ``create_eval_transform`` without this repo."""
    return {
        "image_size": image_size,
        "resize_mode": resize_mode,
        "crop_pct": crop_pct,
        "mean": list(mean),
        "std": list(std),
        "color": "RGB",
        "alpha": ALPHA_RULE,  # transparency composited onto white, as decode_rgb does
        "layout": "NCHW",
        "scale": "pixels / 255 before mean/std",
    }
