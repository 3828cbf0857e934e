"""Which images are held out, and how much: the held-out test split carved by a hash of
each path (:func:`carve_test`, stable as the data grows), the seeded stratified
validation holdout, the checks of both fractions, and the duplicate check across splits.
``trainables/data/datasets.py`` applies them when it builds a split."""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from trainables.data.layouts import DataError

if TYPE_CHECKING:
    from trainables.data.datasets import Sample

# The reference guide asks for a 15-30 % holdout: less makes per-class val
# metrics too noisy to rank trials, more starves training on small data sets.
VAL_FRACTION_RANGE = (0.15, 0.30)
TEST_FRACTION_MAX = 0.30
_TEST_SALT = b"tunecv-test:"
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
    digest = hashlib.sha256(_TEST_SALT + path.encode("utf-8")).digest()
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
    by_class: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        by_class[label_of(item)].append(item)
    test_paths = set()
    for members in by_class.values():
        positions = sorted((test_position(item.path), item.path) for item in members)
        below = sum(position < test_fraction for position, _ in positions)
        count = min(max(below, 1), len(members) - 2) if len(members) >= 3 else 0
        test_paths.update(path for _, path in positions[:count])
    return ([item for item in items if item.path not in test_paths],
            [item for item in items if item.path in test_paths])


def check_val_fraction(val_fraction: float) -> None:
    low, high = VAL_FRACTION_RANGE
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not low <= val_fraction <= high:
        raise DataError(
            f"val_fraction must be between {low} and {high} (a 15-30 % holdout), got "
            f"{val_fraction!r}. Pick a value in that range or give an explicit train/val split."
        )


def stratified_holdout(
    samples: list[Sample], class_names: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split  # deferred: slow import, holdout only

    counts = Counter(s.label for s in samples)
    singles = [class_names[label] for label, count in sorted(counts.items()) if count < 2]
    if singles:
        raise DataError(
            f"classes {singles} have a single valid image; a stratified holdout needs at least 2 "
            "per class (one for train, one for val). Add images, drop the class, or give an "
            "explicit train/val split."
        )
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(samples)),
            test_size=val_fraction,
            random_state=seed,
            stratify=[s.label for s in samples],
        )
    except ValueError as err:
        raise DataError(
            f"cannot hold out val_fraction={val_fraction} of {len(samples)} images stratified over "
            f"{len(class_names)} classes ({err}). Add images or give an explicit train/val split."
        ) from err
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


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
