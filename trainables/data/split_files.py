"""The split file written next to a run: ``split.parquet`` (one row per image: split,
path, label, class name, sha1) and its ``split.json`` sidecar (root, classes, bad files,
duplicates, fingerprint), on a local path or an object store. Reading checks the rows
against the stored fingerprint, so an edited file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainables.data.datasets import DataSplit, Sample
from trainables.data.images import BadImage
from trainables.data.layouts import SPLITS, DataError
from trainables.data.locations import resolve_location


def _sidecar(path: str) -> str:
    if not path.endswith(".parquet"):
        raise DataError(
            f"split file must be a .parquet path, got {path!r}; metadata goes to <stem>.json."
        )
    return path[: -len(".parquet")] + ".json"


def write_split(split: DataSplit, location: str | Path) -> None:
    """Write ``split`` as Parquet rows plus a ``<stem>.json`` with the rest.

    Args:
        split: The split to store.
        location: The Parquet file, a local path or an object-store URI; the JSON
            sidecar goes next to it.

    Raises:
        DataError: ``location`` does not end in ``.parquet``.
    """
    fs, path = resolve_location(location)
    sidecar = _sidecar(path)
    rows = [(name, s) for name in SPLITS for s in split.samples(name)]
    table = pa.table(
        {
            "split": pa.array([name for name, _ in rows], pa.string()),
            "path": pa.array([s.path for _, s in rows], pa.string()),
            "label": pa.array([s.label for _, s in rows], pa.int64()),
            "class_name": pa.array([split.class_names[s.label] for _, s in rows], pa.string()),
            "sha1": pa.array([s.sha1 for _, s in rows], pa.string()),
        }
    )
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    meta = {
        "root": split.root,
        "class_names": list(split.class_names),
        "bad_files": [{"path": b.path, "reason": b.reason} for b in split.bad_files],
        "duplicates_across_splits": [list(pair) for pair in split.duplicates_across_splits],
        "fingerprint": split.fingerprint(),
    }
    with fs.open_output_stream(sidecar) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))


def read_split(location: str | Path) -> DataSplit:
    """Read a split written by :func:`write_split`, from a local path or an object-store URI.

    Raises:
        DataError: A file is missing or malformed, or the rows no longer match
            the stored fingerprint (the file was edited after writing).
    """
    try:
        fs, path = resolve_location(location)
        table = pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(_sidecar(path)) as f:
            meta = json.loads(f.readall().decode("utf-8"))
        class_names = tuple(meta["class_names"])
        # class_name is a convenience column for people reading the file; labels rule.
        columns = [table.column(name).to_pylist() for name in ("split", "path", "label", "sha1")]
        by_split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
        for split, rel, label, sha1 in zip(*columns):
            if not 0 <= label < len(class_names):
                raise ValueError(f"label {label} of {rel!r} is not a class index")
            by_split[split].append(Sample(rel, int(label), sha1))
        result = DataSplit(
            root=meta["root"],
            class_names=class_names,
            train=tuple(by_split["train"]),
            val=tuple(by_split["val"]),
            bad_files=tuple(BadImage(b["path"], b["reason"]) for b in meta["bad_files"]),
            duplicates_across_splits=tuple((t, v) for t, v in meta["duplicates_across_splits"]),
            test=tuple(by_split["test"]),
        )
        expected = meta["fingerprint"]
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"cannot read split file {str(location)!r}: {err!r}. Regenerate it with write_split."
        ) from err
    if result.fingerprint() != expected:
        raise DataError(
            f"split file {str(location)!r} does not match its fingerprint {expected}; it was edited "
            "after writing. Regenerate it with prepare_split and write_split."
        )
    return result
