"""Which images are held out, and how much: the held-out test split and the validation
holdout, each carved class by class by a hash of each path (:func:`carve_test`,
:func:`carve_val`) so that a file keeps its split as the data grows around it; the checks
of both fractions, and the duplicate check across splits.
``trainables/data/datasets.py`` applies them when it builds a split."""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

from trainables.data.layouts import DataError

if TYPE_CHECKING:
    from trainables.data.datasets import Sample

# The reference guide asks for a 15-30 % holdout: less makes per-class val
# metrics too noisy to rank trials, more starves training on small data sets.
VAL_FRACTION_RANGE = (0.15, 0.30)
TEST_FRACTION_MAX = 0.30
_TEST_SALT = b"tunecv-test:"
_VAL_SALT = b"tunecv-val:"
_MAX_DUPLICATE_EXAMPLES = 5


def check_test_fraction(test_fraction: float) -> None:
    is_number = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
    if not is_number or not 0 <= test_fraction <= TEST_FRACTION_MAX:
        raise DataError(
            f"test_fraction must be between 0 and {TEST_FRACTION_MAX}, got {test_fraction!r}. Use 0 for no "
            "held-out test split, or give root/test/<class> folders or a manifest's split=test rows."
        )


def test_position(path: str) -> float:
    """Where ``path`` falls in [0, 1): a hash of the path alone, so a file keeps its side of
    the test split whatever the seed and however the data grows around it."""
    return _position(_TEST_SALT, path)


def _position(salt: bytes, path: str) -> float:
    """The first 8 bytes of sha256(salt + path) as a fraction of 2**64."""
    digest = hashlib.sha256(salt + path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def carve_test(items: Sequence[Any], test_fraction: float, label_of: Callable[[Any], Any]
               ) -> tuple[list[Any], list[Any]]:
    """Split ``items`` (anything with a ``path``) into (rest, test), class by class.

    An item is test when its :func:`test_position` is below ``test_fraction``: the share is
    binomial, not exact, but a file never changes side as the data grows, so a retrain's
    old model is never scored on a new draw of images it trained on. Each class of three
    or more items gives at least one test item and keeps at least two (one train, one
    val); smaller classes give none.
    """
    if not test_fraction:
        return list(items), []
    return _carve(items, label_of, test_position, test_fraction, keep=2)


def _carve(items: Sequence[Any], label_of: Callable[[Any], Any], position: Callable[[str], float],
           fraction: float, keep: int) -> tuple[list[Any], list[Any]]:
    """(kept, carved): per class, the items whose ``position`` is below ``fraction``; at
    least one, its lowest, and never more than leave ``keep`` behind (a class of ``keep``
    or fewer gives none). Both lists keep the order of ``items``."""
    by_class: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        by_class[label_of(item)].append(item)
    carved = set()
    for members in by_class.values():
        positions = sorted((position(item.path), item.path) for item in members)
        below = sum(p < fraction for p, _ in positions)
        count = min(max(below, 1), len(members) - keep) if len(members) > keep else 0
        carved.update(path for _, path in positions[:count])
    return ([item for item in items if item.path not in carved],
            [item for item in items if item.path in carved])


def check_val_fraction(val_fraction: float) -> None:
    low, high = VAL_FRACTION_RANGE
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not low <= val_fraction <= high:
        raise DataError(
            f"val_fraction must be between {low} and {high} (a 15-30 % holdout), got "
            f"{val_fraction!r}. Pick a value in that range or give an explicit train/val split."
        )


def val_position(path: str, seed: int) -> float:
    """Where ``path`` falls in [0, 1) for the validation holdout: a hash of the seed and the
    path alone, so with the same seed a file keeps its side however the data grows."""
    return _position(_VAL_SALT + f"{seed}:".encode(), path)


def carve_val(items: Sequence[Any], val_fraction: float, label_of: Callable[[Any], Any], seed: int
              ) -> tuple[list[Any], list[Any]]:
    """Split ``items`` (anything with a ``path``) into (train, val), class by class.

    An item is val when its :func:`val_position` is below ``val_fraction``. A quantile rule
    (the ``k`` lowest of each class, as a stratified draw takes) would move old training
    images into validation as a class grows; a threshold never does, so a retrain's
    champion is not scored on a new draw of images it trained on. The price is a binomial
    share per class instead of an exact one (docs/numbers.md measures it).
    Each class gives at least one val item, its lowest, and keeps at least one for
    training: a class of two has one of each. Those two bounds are the only way a file
    changes side as its class grows, and only in classes of a few images: the floor
    moves its val image to train when a new file falls lower; the cap, when every
    position of a tiny class was below the threshold, moves its kept image to val once
    the class grows. The retrain gate leaves such images out (``search/retrain/gate.py``).
    """
    return _carve(items, label_of, lambda path: val_position(path, seed), val_fraction, keep=1)


def hash_holdout(
    samples: list[Sample], class_names: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The validation holdout of ``samples`` (:func:`carve_val`), refusing classes of one image."""
    counts = Counter(s.label for s in samples)
    singles = [class_names[label] for label, count in sorted(counts.items()) if count < 2]
    if singles:
        raise DataError(
            f"classes {singles} have a single valid image; a validation holdout needs at least 2 "
            "per class (one for train, one for val). Add images, drop the class, or give an "
            "explicit train/val split."
        )
    return carve_val(samples, val_fraction, lambda s: s.label, seed)


def duplicate_pairs(train: Sequence[Sample], val: Sequence[Sample]) -> tuple[tuple[str, str], ...]:
    """Pair each image of ``val`` (a later split) with the first of ``train`` of identical bytes."""
    train_path_of: dict[str, str] = {}
    for sample in train:
        train_path_of.setdefault(sample.sha1, sample.path)
    pairs = tuple((train_path_of[s.sha1], s.path) for s in val if s.sha1 in train_path_of)
    if pairs:
        examples = ", ".join(f"{t} == {v}" for t, v in pairs[:_MAX_DUPLICATE_EXAMPLES])
        warnings.warn(
            f"{len(pairs)} held-out image(s) have byte-identical copies in an earlier split, which "
            f"inflates their metrics; e.g. {examples}. Remove the copies from one split.",
            UserWarning,
            stacklevel=3,
        )
    return pairs
