"""A run's data, scanned once: the fixed split every trial and the export use, written
by the driver before any trial, and its printed summary (counts per class and split,
each skipped file with its reason).
"""

from __future__ import annotations

from search.config import RunConfig
from trainables.datasets import DataSplit, prepare_split, write_split

_MAX_LISTED_BAD_FILES = 20


def scan_data(cfg: RunConfig, print_fn=print) -> DataSplit:
    """Scan and split the data, print the summary; nothing is written.

    Raises:
        trainables.layouts.DataError: The data cannot produce a usable split.
    """
    split = prepare_split(
        cfg.data.root,
        manifest=cfg.data.manifest,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.optim.seed,
        strict=cfg.data.strict,
        max_pixels=cfg.data.max_image_pixels,
    )
    print_fn(describe_split(split))
    return split


def prepare_data(cfg: RunConfig, split_location: str, print_fn=print) -> DataSplit:
    """``scan_data``, then write the split to ``split_location``."""
    split = scan_data(cfg, print_fn)
    write_split(split, split_location)
    return split


def describe_split(split: DataSplit) -> str:
    """Counts per class and split, and every skipped file with its reason."""
    train, val = split.class_counts("train"), split.class_counts("val")
    lines = [
        f"data: {len(split.train)} train / {len(split.val)} val images, "
        f"{len(split.class_names)} classes, fingerprint {split.fingerprint()[:12]}"
    ]
    for name, n_train, n_val in zip(split.class_names, train, val):
        lines.append(f"  {name}: {n_train} train, {n_val} val")
    if split.bad_files:
        lines.append(f"skipped {len(split.bad_files)} bad file(s):")
        for bad in split.bad_files[:_MAX_LISTED_BAD_FILES]:
            lines.append(f"  {bad.path}: {bad.reason}")
        if len(split.bad_files) > _MAX_LISTED_BAD_FILES:
            lines.append(f"  ... and {len(split.bad_files) - _MAX_LISTED_BAD_FILES} more (see split.json)")
    return "\n".join(lines)
