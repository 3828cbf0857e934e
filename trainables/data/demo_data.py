"""Bundled demo data and a synthetic image generator, written as class folders.

This module owns two small data sets that need no download: scikit-learn's
digits (shipped inside the package) upscaled to PNG, and a seeded synthetic
set whose classes differ by colour and stripe orientation, with optional class
imbalance and varying aspect ratios to exercise samplers and resizing. Both
write the ``root/<class>/<file>.png`` layout that ``trainables.data.datasets`` reads;
neither knows about splits or training.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

_MIN_SIDE = 8


def write_digits(out_dir: Path, image_size: int = 64) -> dict[str, int]:
    """Write scikit-learn's 1,797 8x8 digits as grayscale PNGs.

    Files go to ``out_dir/<digit>/<index:04d>.png`` (index into the data set),
    upscaled with bicubic interpolation; existing files are overwritten.

    Args:
        out_dir: Folder to write the class folders into.
        image_size: Side of the square output images, at least 8.

    Returns:
        Images written per class, keyed by digit ("0" to "9").

    Raises:
        ValueError: ``image_size`` is not an integer of at least 8.
    """
    from sklearn.datasets import load_digits  # deferred: slow import, demo only

    _check_side("image_size", image_size)
    digits = load_digits()
    # Pixel values run 0..16 (ink counts on a 4x4 grid): 16 * 255 / 16 = 255.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    counts: dict[str, int] = {}
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        class_dir = Path(out_dir) / str(int(target))
        class_dir.mkdir(parents=True, exist_ok=True)
        upscaled = Image.fromarray(image, "L").resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        upscaled.save(class_dir / f"{index:04d}.png")
        counts[class_dir.name] = counts.get(class_dir.name, 0) + 1
    return dict(sorted(counts.items()))


def render_hard_digit(image: np.ndarray, rng: np.random.Generator, image_size: int) -> Image.Image:
    """One of scikit-learn's 8x8 digits (values 0..16) as ``write_hard_digits`` draws it:
    rotated, scaled, shifted, on a random grey background with contrast and noise."""
    ink = Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8), "L")
    scale = rng.uniform(0.8, 1.05)
    side = max(_MIN_SIDE, round(image_size * scale))
    glyph = ink.resize((side, side), Image.Resampling.BICUBIC).rotate(
        rng.uniform(-15, 15), Image.Resampling.BILINEAR, expand=False
    )
    canvas = Image.new("L", (image_size, image_size))
    shift = rng.uniform(-0.1, 0.1, size=2) * image_size
    offset = ((image_size - side) // 2 + round(shift[0]), (image_size - side) // 2 + round(shift[1]))
    canvas.paste(glyph, offset)
    background, contrast = rng.uniform(0, 120), rng.uniform(0.5, 1.0)
    pixels = background + contrast * np.asarray(canvas, dtype=np.float64)
    pixels += rng.normal(0, 18, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def write_hard_digits(out_dir: Path, image_size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write a harder, imbalanced variant of the digits as grayscale PNGs.

    Each digit is rotated (up to 15 degrees), scaled (0.8-1.05), shifted (up to 10% of
    the side), put on a random grey background with random contrast and pixel noise.
    Class ``k`` keeps ``180 * 0.85**k`` of its images (180 to 41), so the set has a 4.4x
    imbalance: small, grey, low-resolution and imbalanced, like the data a search
    must do well on without pretrained weights. Same seed, same bytes.

    Returns:
        Images written per class, keyed by digit ("0" to "9").
    """
    from sklearn.datasets import load_digits

    _check_side("image_size", image_size)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        label = str(int(target))
        if counts.get(label, 0) >= int(180 * 0.85 ** int(target)):
            continue
        class_dir = Path(out_dir) / label
        class_dir.mkdir(parents=True, exist_ok=True)
        render_hard_digit(image, rng, image_size).save(class_dir / f"{index:04d}.png")
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def write_synthetic(
    out_dir: Path,
    *,
    num_classes: int = 4,
    images_per_class: int | Sequence[int] = 30,
    image_size: int | tuple[int, int] = 48,
    aspect_ratios: Sequence[float] = (1.0,),
    seed: int = 0,
) -> dict[str, int]:
    """Write a learnable synthetic classification set as RGB PNGs.

    Class ``k`` has its own hue and stripe orientation (``k * 180 / num_classes``
    degrees); every image jitters angle, stripe phase and period, colour and
    brightness and adds pixel noise, so no two images are identical. Image
    ``i`` of a class multiplies the width/height ratio of ``image_size`` by
    ``aspect_ratios[i % len(aspect_ratios)]``, keeping the area about the same.

    Args:
        out_dir: Folder to write ``class_<k>/<i:04d>.png`` into.
        num_classes: Number of classes, at least 2.
        images_per_class: One count for all classes, or one per class for an
            imbalanced set.
        image_size: Side of a square image, or ``(height, width)``; sets the
            area kept across aspect ratios.
        aspect_ratios: Factors on the width/height ratio, cycled through
            per class; ``(1.0,)`` keeps ``image_size`` as given.
        seed: Same seed, same bytes; each class draws from its own stream.

    Returns:
        Images written per class folder name.

    Raises:
        ValueError: An argument is out of range or the wrong length.
    """
    counts = _check_synthetic_args(num_classes, images_per_class, aspect_ratios)
    if isinstance(image_size, int):
        _check_side("image_size", image_size)
        height = width = image_size
    else:
        height, width = tuple(image_size)
        _check_side("image_size height", height)
        _check_side("image_size width", width)
    written: dict[str, int] = {}
    for class_index, count in enumerate(counts):
        rng = np.random.default_rng((seed, class_index))
        class_dir = Path(out_dir) / f"class_{class_index}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for image_index in range(count):
            ratio = width / height * aspect_ratios[image_index % len(aspect_ratios)]
            size = _size_for_ratio(height * width, ratio)
            pixels = _striped_image(class_index, num_classes, size, rng)
            Image.fromarray(pixels, "RGB").save(class_dir / f"{image_index:04d}.png")
        written[class_dir.name] = count
    return written


def _check_side(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_SIDE:
        raise ValueError(
            f"{name} must be an integer of at least {_MIN_SIDE} pixels, got {value!r}."
        )


def _check_synthetic_args(
    num_classes: int, images_per_class: int | Sequence[int], aspect_ratios: Sequence[float]
) -> list[int]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}.")
    if isinstance(images_per_class, int):
        counts = [images_per_class] * num_classes
    else:
        counts = list(images_per_class)
    if len(counts) != num_classes:
        raise ValueError(
            f"images_per_class has {len(counts)} entries but num_classes is {num_classes}; "
            "give one count per class or a single integer."
        )
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"images_per_class must be positive integers, got {counts}.")
    if not aspect_ratios or any(not ratio > 0 for ratio in aspect_ratios):
        raise ValueError(
            "aspect_ratios must be a non-empty list of positive width/height ratios, "
            f"got {aspect_ratios!r}."
        )
    return counts


def _size_for_ratio(area: int, ratio: float) -> tuple[int, int]:
    """``(height, width)`` with ``width / height ~= ratio`` and about ``area`` pixels."""
    # e.g. area 48 * 48 = 2304 at ratio 2: width = sqrt(4608) = 68, height = 34.
    width = max(_MIN_SIDE, round(math.sqrt(area * ratio)))
    height = max(_MIN_SIDE, round(math.sqrt(area / ratio)))
    return height, width


def _striped_image(
    class_index: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    height, width = size
    # Classes sit evenly around the hue circle and the half-turn of stripe
    # angles, so neighbours differ by 360/K degrees of hue and 180/K of angle.
    hue = (class_index / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
    angle = math.radians(class_index * 180.0 / num_classes + rng.uniform(-6.0, 6.0))
    period = rng.uniform(0.18, 0.26) * min(height, width) + 3.0
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    across = cols * math.cos(angle) + rows * math.sin(angle)  # distance across the stripes
    stripes = 0.5 + 0.5 * np.sin(2.0 * math.pi * across / period + phase)
    background = rng.uniform(0.05, 0.25)
    image = background + stripes[:, :, None] * (colour - background)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.05, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
