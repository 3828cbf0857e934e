"""A packed dataset: a split's images as Parquet shards of encoded bytes, for trials that
stream it with Ray Data (``trainables/data/stream.py``) instead of opening one file per image.

This module owns the pack's format and reading its description back; writing one is
``search/jobs/pack.py`` (``tunecv data pack``). It does not decode images.

Layout under the pack's location (a folder or a bucket prefix)::

    split=train/<file>.parquet   rows: row, path, label, sha1, image (the file's bytes)
    split=val/<file>.parquet     (hive directories, so a reader gets the split column)
    split.parquet, split.json    the split itself (trainables.data.split_files.write_split)
    pack.json                    written last: its presence means the pack is complete

``row`` is the sample's index in the split (``DataSplit.train``/``val`` order). Training
rows are written in a seeded shuffled order, so that every file mixes the classes: a
trial streams a few files at a time and shuffles only locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from trainables.data.layouts import DataError
from trainables.data.locations import resolve_location

PACK_JSON = "pack.json"
PACK_SPLIT = "split.parquet"
PACK_VERSION = 1
ROWS_PER_FILE = 256  # 1,437 digits -> 6 training files; a rank streams whole files


@dataclass(frozen=True)
class PackFile:
    """One Parquet file of a pack: its path relative to the pack and its row count."""

    path: str
    rows: int


@dataclass(frozen=True)
class Pack:
    """What ``pack.json`` says: where the pack is, how its split was made, its files."""

    location: str
    fingerprint: str  # the split's (DataSplit.fingerprint)
    val_fraction: float | None  # None: the data gave its own train/val split
    seed: int | None
    train: tuple[PackFile, ...]
    val: tuple[PackFile, ...]

    def uri(self, relpath: str) -> str:
        return f"{self.location.rstrip('/')}/{relpath}"

    def filesystem(self):
        """(pyarrow filesystem, the pack's path on it)."""
        return resolve_location(self.location)

    def to_json(self) -> dict:
        return {
            "version": PACK_VERSION, "fingerprint": self.fingerprint, "val_fraction": self.val_fraction,
            "seed": self.seed,
            **{name: [vars(f) for f in files] for name, files in (("train", self.train), ("val", self.val))},
        }


def is_pack(location: str) -> bool:
    """Whether ``location`` holds a complete pack (a ``pack.json``)."""
    import pyarrow.fs as pafs

    try:
        fs, base = resolve_location(location)
        return fs.get_file_info(f"{base.rstrip('/')}/{PACK_JSON}").type == pafs.FileType.File
    except (OSError, ValueError):
        return False


def read_pack(location: str) -> Pack:
    """The pack at ``location``, from its ``pack.json`` (JSON, never unpickled).

    Raises:
        DataError: No complete pack there, or a ``pack.json`` of another version.
    """
    try:
        fs, base = resolve_location(location)
        with fs.open_input_stream(f"{base.rstrip('/')}/{PACK_JSON}") as stream:
            meta = json.loads(stream.readall().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"no pack at {location!r} ({err}): data.loader ray_data reads a pack written by "
                        "`tunecv data pack`; pack the images first, or set data.loader: dataloader.") from err
    if meta.get("version") != PACK_VERSION:
        raise DataError(f"pack {location!r} has version {meta.get('version')!r}, this tunecv reads version "
                        f"{PACK_VERSION}; pack the images again with `tunecv data pack`.")
    return Pack(
        location=location, fingerprint=meta["fingerprint"], val_fraction=meta["val_fraction"], seed=meta["seed"],
        train=tuple(PackFile(**f) for f in meta["train"]), val=tuple(PackFile(**f) for f in meta["val"]),
    )


def read_pack_split(pack: Pack):
    """The split the pack holds (``split.parquet``, checked against its fingerprint).

    Raises:
        DataError: The split file is missing, edited, or not the one ``pack.json`` names.
    """
    from trainables.data.split_files import read_split

    split = read_split(pack.uri(PACK_SPLIT))
    if split.fingerprint() != pack.fingerprint:
        raise DataError(f"pack {pack.location!r}: split.parquet has fingerprint {split.fingerprint()[:12]}, "
                        f"pack.json {pack.fingerprint[:12]}; the pack was modified. Pack the images again.")
    return split
