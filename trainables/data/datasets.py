"""The train/val/test split: from candidate files to a frozen, scanned split, held out per class.

This module owns the step from "a data root on disk" to a frozen
:class:`DataSplit`: taking the candidates that ``trainables.data.layouts`` finds,
skipping or failing on bad files found by :func:`trainables.data.images.scan_images`,
holding out test and validation images by the rules of ``trainables.data.holdout``,
and the torch :class:`ImageDataset` that reads the samples back. The split file a run
keeps is ``trainables.data.split_files``'s. Decoding itself lives in
``trainables.data.images``; augmentation pipelines are built elsewhere and only passed
in as a callable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import torch.utils.data

from trainables.data.holdout import (
    carve_test, carve_val, check_test_fraction, check_val_fraction, duplicate_pairs, hash_holdout,
)
from trainables.data.images import DEFAULT_MAX_PIXELS, BadImage, decode_rgb, load_rgb
from trainables.data.layouts import SPLITS, Candidate, DataError, listed_candidates, manifest_candidates, walk_folders
from trainables.data.roots import DataRoot, FileEntry, key_inside
from trainables.data.scan import scan_all

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Sample:
    """One usable image: ``path`` is relative to the data root, posix style."""

    path: str
    label: int
    sha1: str


@dataclass(frozen=True)
class DataSplit:
    """The exact samples a trial trains and evaluates on (train, val), and the held-out
    ``test`` samples that only the exported model is scored on, after the search."""

    root: str
    class_names: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    bad_files: tuple[BadImage, ...]
    duplicates_across_splits: tuple[tuple[str, str], ...]  # (train or val path, later split's path)
    test: tuple[Sample, ...] = ()

    def samples(self, split: str) -> tuple[Sample, ...]:
        """The samples of ``split``: "train", "val" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        return getattr(self, split)

    def fingerprint(self) -> str:
        """Identify the data a model saw, independent of where the root lives.

        Returns:
            A sha256 hex digest over the class names and the sorted
            ``(split, path, label, sha1)`` rows.
        """
        rows = sorted(
            (split, sample.path, sample.label, sample.sha1)
            for split in SPLITS  # a split without test hashes as it did before test existed
            for sample in self.samples(split)
        )
        payload = json.dumps(
            {"class_names": list(self.class_names), "rows": rows}, separators=(",", ":")
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def class_counts(self, split: str = "train") -> list[int]:
        """Number of samples per class index in ``split`` ("train", "val" or "test").

        Raises:
            ValueError: ``split`` is not one of those.
        """
        counts = [0] * len(self.class_names)
        for sample in self.samples(split):
            counts[sample.label] += 1
        return counts


@dataclass(frozen=True)
class Listing:
    """What a data root holds before any file is read: its classes, the candidate files
    with their class and given split, and each one's size and modification time."""

    root: DataRoot
    class_names: list[str]
    candidates: list[Candidate]
    entries: list[FileEntry]  # one per candidate, in order; size -1 when it cannot be found

    def most_train_images(self, val_fraction: float, test_fraction: float = 0.0, seed: int = 0) -> int:
        """The training images the split will have if every listed file is valid (the
        holdouts hash paths, so the listing decides them): what batch sizes are checked
        against before the scan."""
        by_class = lambda c: c.class_name  # noqa: E731
        if any(c.split is not None for c in self.candidates):
            train = [c for c in self.candidates if c.split == "train"]
            if any(c.split == "test" for c in self.candidates):
                return len(train)
            return len(carve_test(train, test_fraction, by_class)[0])
        rest = carve_test(self.candidates, test_fraction, by_class)[0]
        return len(carve_val(rest, val_fraction, by_class, seed)[0])


def list_data(root: str | Path, manifest: str | Path | None = None) -> Listing:
    """Find the candidate files under ``root`` (a local folder or an object-store URI):
    class folders, train/val folders, or the rows of a CSV/Parquet ``manifest``.

    Raises:
        DataError: The root is missing or empty, a path escapes it, the manifest is
            malformed, or there are fewer than two classes.
    """
    data_root = DataRoot.of(root)
    data_root.check_exists()
    manifest = None if manifest is None else os.fspath(manifest)
    if data_root.is_local:
        root_abs = Path(data_root.location)
        if manifest is None:
            class_names, candidates, stats = walk_folders(root_abs)
            entries = [FileEntry(c.path, -1, 0) if info is None else FileEntry(c.path, info.st_size, info.st_mtime_ns)
                       for c, info in zip(candidates, stats)]
        else:
            class_names, candidates = manifest_candidates(root_abs, manifest)
            entries = [_stat(root_abs, c.path) for c in candidates]
    else:
        listed = {entry.path: entry for entry in data_root.list_files()}
        if manifest is None:
            for key in listed:
                key_inside(data_root, key)  # keys such as a/../b are objects of their own: refused
            class_names, candidates = listed_candidates(data_root.location, list(listed))
        else:
            class_names, candidates = manifest_candidates(  # no local root: keys are checked instead
                Path(data_root.location), manifest, to_relative=lambda raw: key_inside(data_root, raw))
        entries = [listed.get(c.path, FileEntry(c.path, -1, 0)) for c in candidates]
    if len(class_names) < 2:
        raise DataError(
            f"found {len(class_names)} class(es) {class_names} under {data_root.location!r}; "
            "classification needs at least 2."
        )
    per_class = Counter(c.class_name for c in candidates if c.split in (None, "train"))
    empty = [name for name in class_names if not per_class[name]]
    if empty:  # known from the listing: no image needs reading to say so
        raise DataError(f"data root '{data_root.location}': classes {empty} have no valid training image; add "
                        "images or remove the class folder.")
    return Listing(data_root, class_names, candidates, entries)


def _stat(root_abs: Path, relpath: str) -> FileEntry:
    try:
        info = os.stat(root_abs / relpath)
    except OSError:
        return FileEntry(relpath, -1, 0)  # a dangling link or a missing manifest row: the scan says why
    return FileEntry(relpath, info.st_size, info.st_mtime_ns)


def prepare_split(
    root: str | Path,
    *,
    manifest: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    test_fraction: float = 0.0,
) -> DataSplit:
    """Find, validate and split the images under ``root``, scanning every file here
    (``search/scan_cache.py`` is the cached, distributed version for runs).

    Args:
        root: The data root (a local folder or an object-store URI); every image must
            lie inside it.
        manifest: A CSV or Parquet file with columns ``path,label[,split]``;
            ``None`` reads class folders instead.
        val_fraction: Validation share of what is left after the test split, when no
            split is given, within 0.15-0.30.
        seed: Seed of the validation holdout's hash (:func:`carve_val`).
        strict: Raise on any bad file instead of skipping it.
        max_pixels: Largest ``width * height`` accepted per image.
        test_fraction: Share held out as test when the data gives no test split
            (:func:`carve_test`), from the training images of a given split; 0 for none.

    Returns:
        The frozen split, samples sorted by path within each split.

    Raises:
        DataError: Out-of-range ``val_fraction``, a path escaping the root, a
            malformed manifest, bad files with ``strict``, fewer than two
            classes, a class without valid images, or a class of one image
            to hold out from.
    """
    check_val_fraction(val_fraction)
    check_test_fraction(test_fraction)
    listing = list_data(root, manifest)
    scanned = scan_all(listing.root, listing.entries, max_pixels)
    return split_scanned(listing, scanned, val_fraction=val_fraction, seed=seed, strict=strict,
                         test_fraction=test_fraction)


def split_scanned(listing: Listing, scanned: pa.Table, *, val_fraction: float = 0.2, seed: int = 0,
                  strict: bool = False, test_fraction: float = 0.0) -> DataSplit:
    """The split of ``listing``, given its scan (``trainables.data.scan`` rows, any order,
    one per listed file). Raises as :func:`prepare_split`."""
    check_val_fraction(val_fraction)
    check_test_fraction(test_fraction)
    labelled, bad_files = _labelled(listing, scanned, strict)
    candidates, class_names = listing.candidates, listing.class_names
    by_label = lambda sample: sample.label  # noqa: E731
    if all(c.split is None for c in candidates):
        rest, test = carve_test([s for s, _ in labelled], test_fraction, by_label)
        train, val = hash_holdout(rest, class_names, val_fraction, seed)
    else:
        train = [sample for sample, split in labelled if split == "train"]
        val = [sample for sample, split in labelled if split == "val"]
        test = [sample for sample, split in labelled if split == "test"]
        if not val:
            raise DataError("the given split has no valid 'val' image; add some or drop the split.")
        if not test and not any(c.split == "test" for c in candidates):
            train, test = carve_test(train, test_fraction, by_label)
    for samples in (train, val, test):
        samples.sort(key=lambda sample: sample.path)
    duplicates = duplicate_pairs(train, val) + duplicate_pairs(train + val, test)
    return DataSplit(
        listing.root.location, tuple(class_names), tuple(train), tuple(val), bad_files, duplicates,
        tuple(test),
    )


def _labelled(listing: Listing, scanned: pa.Table, strict: bool
              ) -> tuple[list[tuple[Sample, str | None]], tuple[BadImage, ...]]:
    """Usable samples with their split, and the bad files, in listing order."""
    columns = [scanned.column(name).to_pylist() for name in ("path", "sha1", "bad_reason")]
    result_of = {path: (sha1, reason) for path, sha1, reason in zip(*columns)}
    bad_files = tuple(BadImage(c.path, result_of[c.path][1]) for c in listing.candidates
                      if result_of[c.path][1] is not None)
    root = listing.root.location
    if bad_files:
        listing_text = "\n".join(f"  {b.path}: {b.reason}" for b in bad_files)
        if strict:
            raise DataError(
                f"{len(bad_files)} bad file(s) found (strict=True):\n{listing_text}\n"
                "Fix or remove them, or pass strict=False to skip them."
            )
        # Callers report bad_files themselves; this is for debugging a run from its log.
        logger.info("skipping %d bad file(s):\n%s", len(bad_files), listing_text)
    label_of = {name: index for index, name in enumerate(listing.class_names)}
    labelled = [
        (Sample(c.path, label_of[c.class_name], result_of[c.path][0]), c.split)
        for c in listing.candidates
        if result_of[c.path][1] is None
    ]
    train_counts = Counter(sample.label for sample, split in labelled if split in (None, "train"))
    empty = [name for index, name in enumerate(listing.class_names) if not train_counts[index]]
    if empty:
        skipped = (f" ({len(bad_files)} unreadable file(s) skipped, e.g. {bad_files[0].path}: "
                   f"{bad_files[0].reason})" if bad_files else "")
        raise DataError(
            f"data root '{root}': classes {empty} have no valid training image{skipped}; add images "
            "or remove the class folder."
        )
    return labelled, bad_files


class ImageDataset(torch.utils.data.Dataset):
    """Reads samples from disk or an object store and applies an albumentations pipeline.

    Args:
        root: The data root the sample paths are relative to: a local folder or an
            object-store URI.
        samples: The samples to serve, in order.
        transform: An albumentations ``Compose`` ending in ``ToTensorV2``,
            called as ``transform(image=rgb)["image"]``; ``None`` returns the
            raw HxWx3 uint8 array.
        max_pixels: Largest ``width * height`` accepted per image.
        cache_bytes: Keep decoded images in memory, up to this many bytes, so later
            epochs skip the decode. Only for a dataset read by the training process
            itself: each loader process would hold a copy of its own.
    """

    def __init__(
        self,
        root: str,
        samples: Sequence[Any],
        transform: Callable[..., Any] | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_bytes: int = 0,
    ):
        if transform is not None and not callable(transform):
            raise TypeError(
                "transform must be an albumentations Compose or None, "
                f"got {type(transform).__name__}."
            )
        self._root = DataRoot.of(root)
        # Flat lists of str/int instead of Sample objects: forked DataLoader
        # workers touch refcounts of every object they read, so fewer objects
        # means fewer copy-on-write pages per worker.
        self._paths = [self._root.path_of(s.path) for s in samples]
        self._relpaths = None if self._root.is_local else [s.path for s in samples]
        self._labels = [int(s.label) for s in samples]
        self._transform = transform
        self._max_pixels = max_pixels
        self._cache: dict[int, Any] = {}
        self._cache_room = cache_bytes

    def reseed(self, seed: int) -> None:
        """Reseed the transform's own RNG (albumentations ignores numpy's global seed)."""
        if hasattr(self._transform, "set_random_seed"):
            self._transform.set_random_seed(seed)

    @property
    def labels(self) -> list[int]:
        """Class index of every sample, in dataset order (for samplers)."""
        return list(self._labels)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rgb = self._cache.get(index)
        if rgb is None:
            if self._relpaths is None:
                rgb = load_rgb(self._paths[index], max_pixels=self._max_pixels)
            else:  # the root's filesystem, opened once by the process that reads (a loader process too)
                data = self._root.read_bytes(self._relpaths[index])
                rgb = decode_rgb(data, max_pixels=self._max_pixels, name=self._paths[index])
            if rgb.nbytes <= self._cache_room:
                rgb.setflags(write=False)  # a transform that wrote in place would corrupt later epochs: it raises
                self._cache[index] = rgb
                self._cache_room -= rgb.nbytes
        label = self._labels[index]
        if self._transform is None:
            return rgb, label
        image = self._transform(image=rgb)["image"]
        if not isinstance(image, torch.Tensor):
            raise TypeError(
                f"transform returned {type(image).__name__} for {self._paths[index]!r}, expected a "
                "torch.Tensor; end the Compose with albumentations.pytorch.ToTensorV2()."
            )
        return image, label
