"""Where samples come from: the three data layouts, and paths kept inside the data root.

This module owns finding candidate files (``root/train|val/<class>``, ``root/<class>``,
or a CSV/Parquet manifest with ``path,label[,split]``) and rejecting any path that
escapes the data root (``..``, absolute paths elsewhere, symlinks out) or a folder
symlink that loops back into its own ancestry (``class_0/loop -> ..``). It does not
decode, scan or split anything: ``trainables.data.datasets`` turns candidates into a split.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from trainables.data.locations import resolve_location

# train and val are required together; test is optional and never seen by the search
# (``trainables/data/datasets.py`` carves one out of train when the data gives none).
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The data root, manifest or split file cannot produce a usable split."""


class Candidate(NamedTuple):
    path: str  # relative to the root, posix style
    class_name: str
    split: str | None  # None when the split is held out by hash (trainables/data/holdout.py)


def resolve_inside(root: Path, relpath: str) -> Path:
    """Join ``relpath`` onto ``root`` and refuse anything that escapes it.

    ``..`` components, absolute paths elsewhere and symlinks whose target lies
    outside the root are all caught by comparing real paths.

    Args:
        root: The data root.
        relpath: A path relative to ``root``, or absolute but inside it.

    Returns:
        The normalised absolute path (symlinks kept, so class folders stay
        as the user laid them out).

    Raises:
        DataError: The real path of the result is not inside the real root.
    """
    root_abs = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(root_abs, os.fspath(relpath)))
    root_real = os.path.realpath(root_abs)
    target_real = os.path.realpath(candidate)
    if os.path.commonpath([root_real, target_real]) != root_real:
        raise DataError(
            f"path {os.fspath(relpath)!r} resolves to {target_real!r}, outside the data root "
            f"{root_real!r}. Paths must stay inside the root (no '..', no absolute paths "
            "elsewhere, no symlinks pointing out): copy the file under the root or choose "
            "a root that contains it."
        )
    return Path(candidate)


def relative_posix(root_abs: Path, path: Path) -> str:
    try:
        return path.relative_to(root_abs).as_posix()
    except ValueError:
        # Inside only by real path, e.g. the root is itself a symlink.
        return Path(os.path.realpath(path)).relative_to(os.path.realpath(root_abs)).as_posix()


def _refuse_loop(root_abs: Path, link: str, parent_real: str, target_real: str) -> None:
    """Refuse a folder symlink whose target is the folder it sits in or one above it.

    The walk would re-enter a folder it is already inside: ``class_0/loop -> ..``
    labels every other class's images ``class_0``. Checked before the escape rule, so a
    link to the root's own parent gets this message too. A link to a sibling folder is
    not a loop and is followed (its copies are reported as duplicates).

    Raises:
        DataError: Naming the link relative to the root, its target, and the fix.
    """
    if os.path.commonpath([parent_real, target_real]) != target_real:
        return
    root_real = os.path.realpath(root_abs)
    if target_real == root_real:
        where = "the data root itself"
    elif os.path.commonpath([root_real, target_real]) == root_real:
        where = f"{Path(target_real).relative_to(root_real).as_posix()!r} in the data root"
    else:
        where = f"{target_real!r}, above the data root"
    raise DataError(
        f"symlink {relative_posix(root_abs, Path(link))!r} -> {os.readlink(link)!r} points back to "
        f"{where}, which contains the link: the scan would walk into it again and count images twice "
        "or under the wrong class. Remove the link, or point it at a folder inside the root that does "
        "not contain it."
    )


def _class_dirs(root_abs: Path, parent: Path) -> list[str]:
    """Sorted names of the non-hidden subdirectories of ``parent``."""
    names = []
    parent_real = None
    for entry in sorted(os.listdir(parent)):
        path = parent / entry
        if not entry.startswith(".") and path.is_dir():
            if path.is_symlink():  # e.g. root/train/all -> . would hold every class
                parent_real = parent_real or os.path.realpath(parent)
                _refuse_loop(root_abs, str(path), parent_real, os.path.realpath(path))
            resolve_inside(root_abs, str(path))
            names.append(entry)
    return names


def _walk_files(root_abs: Path, class_dir: Path) -> list[tuple[str, os.stat_result | None]]:
    """Every non-hidden regular file under ``class_dir``, recursively, sorted, with its
    ``stat`` (None for a dangling link: the scan reports it as unreadable).

    Folders are checked against the root by real path as they are entered; a plain file
    in a checked folder is inside the root, so only symlinked files need a ``realpath``
    of their own (two per file made a warm scan of 20k files mostly ``lstat`` calls).
    """
    found = []
    class_real = os.path.realpath(class_dir)
    seen_dirs = {class_real}
    pending = [(os.fspath(class_dir), class_real)]  # (path as walked, its real path)
    while pending:
        folder, folder_real = pending.pop()
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                real = os.path.realpath(entry.path)
                if entry.is_symlink():
                    _refuse_loop(root_abs, entry.path, folder_real, real)
                if real in seen_dirs:
                    continue  # already walked: two links to one folder, or siblings linking each other
                resolve_inside(root_abs, entry.path)
                seen_dirs.add(real)
                pending.append((entry.path, real))
                continue
            path = os.fspath(resolve_inside(root_abs, entry.path)) if entry.is_symlink() else entry.path
            try:
                info = os.stat(path)
            except OSError:
                found.append((path, None))
                continue
            if stat.S_ISREG(info.st_mode):  # reading a FIFO or device would block or never end
                found.append((path, info))
    return sorted(found, key=lambda item: item[0])


def walk_folders(root_abs: Path) -> tuple[list[str], list[Candidate], list[os.stat_result | None]]:
    """``folder_candidates``, with each candidate's ``stat`` (None when it cannot be read)."""
    train_dir, val_dir, test_dir = (root_abs / split for split in SPLITS)
    _check_split_folders(str(root_abs), train_dir.is_dir(), val_dir.is_dir())
    layout = [(split, root_abs / split) for split in SPLITS if (root_abs / split).is_dir()] \
        if train_dir.is_dir() else [(None, root_abs)]
    classes_by_split = {split: _class_dirs(root_abs, parent) for split, parent in layout}
    if train_dir.is_dir():
        _check_val_classes(classes_by_split, str(root_abs), str(train_dir))
    prefix = os.fspath(root_abs) + os.sep
    candidates, stats = [], []
    for split, parent in layout:
        for class_name in classes_by_split[split]:
            for path, info in _walk_files(root_abs, parent / class_name):
                relpath = path[len(prefix):] if path.startswith(prefix) else relative_posix(root_abs, Path(path))
                candidates.append(Candidate(relpath, class_name, split))
                stats.append(info)
    return classes_by_split[layout[0][0]], candidates, stats


def _check_split_folders(root: str, has_train: bool, has_val: bool) -> None:
    if has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"{root} has a '{present}' folder but no '{absent}' folder. Use "
            "root/train/<class> with root/val/<class>, or put class folders directly under "
            "the root for a holdout."
        )


def _check_val_classes(classes_by_split: dict, root: str, train_dir: str) -> None:
    for split in ("val", "test"):
        unknown = sorted(set(classes_by_split.get(split, ())) - set(classes_by_split["train"]))
        if unknown:
            raise DataError(
                f"classes {unknown} are in {root}/{split} but not in {train_dir}; a model cannot be "
                "evaluated on classes it never trained on. Add them to train or drop them."
            )


def folder_candidates(root_abs: Path) -> tuple[list[str], list[Candidate]]:
    """The classes and candidate files of ``root/<class>`` or ``root/train|val/<class>``."""
    class_names, candidates, _ = walk_folders(root_abs)
    return class_names, candidates


def _read_manifest_table(manifest: str) -> pa.Table:
    suffix = os.path.splitext(manifest)[1].lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"manifest must be a .csv or .parquet file, got {str(manifest)!r}.")
    try:
        fs, path = resolve_location(manifest)
        if suffix == ".csv":
            as_text = {name: pa.string() for name in ("path", "label", "split")}
            options = pa_csv.ConvertOptions(column_types=as_text, strings_can_be_null=False)
            with fs.open_input_stream(path) as stream:
                return pa_csv.read_csv(stream, convert_options=options)
        return pq.read_table(path, filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read manifest {str(manifest)!r}: {err}") from err


def _manifest_error(manifest: str, row: int, column: str, problem: str) -> DataError:
    where = f"manifest {str(manifest)!r} row {row} (after the header), column {column!r}"
    return DataError(f"{where}: {problem}.")


def manifest_candidates(root_abs: Path, manifest: str, to_relative=None) -> tuple[list[str], list[Candidate]]:
    """The manifest's rows as candidates; ``to_relative(raw path)`` gives a row's path
    relative to the root or raises a DataError (default: the local containment rule)."""
    to_relative = to_relative or (lambda raw: relative_posix(root_abs, resolve_inside(root_abs, raw)))
    table = _read_manifest_table(manifest)
    missing = [name for name in ("path", "label") if name not in table.column_names]
    if missing:
        raise DataError(
            f"manifest {str(manifest)!r} is missing column(s) {missing}; found "
            f"{table.column_names}. It needs 'path' and 'label', and optionally 'split'."
        )
    splits = table.column("split").to_pylist() if "split" in table.column_names else None
    candidates, first_row_of = [], {}
    rows = zip(table.column("path").to_pylist(), table.column("label").to_pylist())
    for index, (raw_path, raw_label) in enumerate(rows):
        row = index + 1  # 1 = first data row, as a spreadsheet shows it below the header
        if raw_path is None or not str(raw_path).strip():
            raise _manifest_error(manifest, row, "path", "empty; every row needs an image path")
        label = "" if raw_label is None else str(raw_label).strip()
        if not label:
            raise _manifest_error(manifest, row, "label", "empty; every row needs a class label")
        split = None
        if splits is not None:
            split = "" if splits[index] is None else str(splits[index]).strip()
            if split not in SPLITS:
                problem = f"got {split!r}, expected 'train', 'val' or 'test' (or drop the column)"
                raise _manifest_error(manifest, row, "split", problem)
        try:
            relpath = to_relative(str(raw_path).strip())
        except DataError as err:
            raise _manifest_error(manifest, row, "path", str(err).rstrip(".")) from err
        if relpath in first_row_of:
            problem = f"{relpath!r} repeats row {first_row_of[relpath]}; list each file once"
            raise _manifest_error(manifest, row, "path", problem)
        first_row_of[relpath] = row
        candidates.append(Candidate(relpath, label, split))
    return sorted({c.class_name for c in candidates}), candidates


def listed_candidates(root: str, keys: list[str]) -> tuple[list[str], list[Candidate]]:
    """``folder_candidates`` for an object-store root, from its listing (keys relative to
    the root): the same two layouts, class folders found from the keys, hidden segments
    skipped, files directly in the root or in train/ and val/ ignored."""
    visible = [key for key in keys if not any(part.startswith(".") for part in key.split("/"))]
    tops = {key.split("/", 1)[0] for key in visible if "/" in key}
    _check_split_folders(root, "train" in tops, "val" in tops)
    split_layout = "train" in tops
    candidates = []
    for key in visible:
        parts = key.split("/")
        if split_layout and parts[0] in SPLITS and len(parts) >= 3:
            candidates.append(Candidate(key, parts[1], parts[0]))
        elif not split_layout and len(parts) >= 2:
            candidates.append(Candidate(key, parts[0], None))
    classes_by_split = {split: sorted({c.class_name for c in candidates if c.split == split})
                        for split in (SPLITS if split_layout else (None,))}
    if split_layout:
        _check_val_classes(classes_by_split, root, f"{root}/train")
    return classes_by_split["train" if split_layout else None], sorted(candidates)
