"""The bundled digits writer and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from trainables.data.datasets import prepare_split
from trainables.data.demo_data import write_digits, write_hard_digits, write_synthetic


def _files(root):
    return sorted(p for p in root.rglob("*.png"))


def _read(path) -> Image.Image:
    """Decode fully and close the file (PIL otherwise keeps it open lazily)."""
    with Image.open(path) as image:
        image.load()
        return image


def test_digits_writes_1797_pngs_in_10_classes(tmp_path):
    counts = write_digits(tmp_path, image_size=24)
    expected = np.bincount(load_digits().target)
    assert counts == {str(digit): int(n) for digit, n in enumerate(expected)}
    assert sum(counts.values()) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(d) for d in range(10)]
    for digit, n in counts.items():
        assert len(list((tmp_path / digit).glob("*.png"))) == n
    sample = _read(tmp_path / "0" / "0000.png")  # load_digits().target[0] == 0
    assert sample.size == (24, 24) and sample.mode == "L"
    # Ink reaches full white after scaling 0..16 to 0..255.
    assert np.asarray(sample).max() >= 240


def test_digits_is_idempotent(tmp_path):
    write_digits(tmp_path, image_size=16)
    before = {p: p.read_bytes() for p in _files(tmp_path)}
    write_digits(tmp_path, image_size=16)
    after = {p: p.read_bytes() for p in _files(tmp_path)}
    assert before == after


def test_digits_rejects_tiny_size(tmp_path):
    with pytest.raises(ValueError, match="image_size must be an integer of at least 8 pixels, got 4"):
        write_digits(tmp_path, image_size=4)


def test_hard_digits_are_imbalanced_deterministic_and_harder_than_the_digits(tmp_path):
    counts = write_hard_digits(tmp_path / "a", image_size=16, seed=3)
    assert counts == {str(k): int(180 * 0.85**k) if k else 178 for k in range(10)}  # digit 0 has 178 scans
    write_hard_digits(tmp_path / "b", image_size=16, seed=3)
    assert [p.read_bytes() for p in _files(tmp_path / "a")] == [p.read_bytes() for p in _files(tmp_path / "b")]

    # A linear model on raw pixels: the clean digits are easy, the hard ones are not.
    def pixels_cv(root):
        files = _files(root)
        x = np.array([np.asarray(_read(p), dtype=np.float32).ravel() / 255.0 for p in files])
        return cross_val_score(LogisticRegression(max_iter=500), x, [p.parent.name for p in files], cv=3).mean()

    write_digits(tmp_path / "clean", image_size=16)
    clean, hard = pixels_cv(tmp_path / "clean"), pixels_cv(tmp_path / "a")
    assert hard < clean - 0.2, (clean, hard)


def test_synthetic_is_deterministic_per_seed(tmp_path):
    kwargs = dict(num_classes=3, images_per_class=4, image_size=16)
    write_synthetic(tmp_path / "a", seed=7, **kwargs)
    write_synthetic(tmp_path / "b", seed=7, **kwargs)
    write_synthetic(tmp_path / "c", seed=8, **kwargs)
    a, b, c = ([p.read_bytes() for p in _files(tmp_path / name)] for name in "abc")
    assert len(a) == 12
    assert a == b
    assert a != c


def test_synthetic_honours_imbalance_and_aspect_ratios(tmp_path):
    counts = write_synthetic(
        tmp_path, num_classes=3, images_per_class=[9, 3, 1], image_size=32, aspect_ratios=(1.0, 2.0, 0.5)
    )
    assert counts == {"class_0": 9, "class_1": 3, "class_2": 1}
    for name, n in counts.items():
        assert len(list((tmp_path / name).glob("*.png"))) == n
    sizes = [_read(tmp_path / "class_0" / f"{i:04d}.png").size for i in range(3)]
    # (width, height) at ~32 * 32 = 1024 pixels: sqrt(2048) = 45, sqrt(512) = 23.
    assert sizes == [(32, 32), (45, 23), (23, 45)]
    assert _read(tmp_path / "class_0" / "0000.png").mode == "RGB"


def test_synthetic_rectangular_image_size(tmp_path):
    write_synthetic(tmp_path, num_classes=2, images_per_class=1, image_size=(20, 40))
    assert _read(tmp_path / "class_1" / "0000.png").size == (40, 20)


def test_synthetic_is_learnable_but_not_constant(tmp_path):
    write_synthetic(tmp_path, num_classes=4, images_per_class=20, image_size=24, seed=1)
    features, labels = [], []
    for k in range(4):
        images = [np.asarray(_read(p), dtype=np.float32) for p in _files(tmp_path / f"class_{k}")]
        assert not np.array_equal(images[0], images[1])  # jitter and noise make every image differ
        for image in images:
            # Mean colour plus horizontal/vertical gradient energy: colour and orientation.
            gradients = [np.abs(np.diff(image, axis=axis)).mean() for axis in (0, 1)]
            features.append(np.concatenate([image.mean(axis=(0, 1)), gradients]))
            labels.append(k)
    model = LogisticRegression(max_iter=2000)
    scores = cross_val_score(model, np.array(features) / 255.0, labels, cv=4)
    assert scores.mean() >= 0.95


def test_synthetic_feeds_prepare_split(tmp_path):
    write_synthetic(tmp_path, num_classes=3, images_per_class=[10, 6, 4], image_size=16)
    split = prepare_split(tmp_path)
    assert split.class_names == ("class_0", "class_1", "class_2")
    assert split.bad_files == () and split.duplicates_across_splits == ()
    assert [a + b for a, b in zip(split.class_counts("train"), split.class_counts("val"))] == [10, 6, 4]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 1}, "num_classes must be an integer of at least 2"),
        ({"num_classes": 3, "images_per_class": [5, 5]}, "has 2 entries but num_classes is 3"),
        ({"num_classes": 2, "images_per_class": [5, 0]}, "images_per_class must be positive integers"),
        ({"aspect_ratios": (1.0, -2.0)}, "aspect_ratios must be a non-empty list of positive"),
        ({"image_size": (4, 32)}, "image_size height must be an integer of at least 8"),
    ],
)
def test_synthetic_rejects_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        write_synthetic(tmp_path, **kwargs)
