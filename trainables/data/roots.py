"""Where a data set lives: a local folder or an object-store prefix (``s3://bucket/data``,
``gs://...``; anything ``pyarrow.fs.FileSystem.from_uri`` opens), and reading a file
under it by its relative path.

This module owns the object-store half of the containment rules (a key under the
root, never beside it); ``trainables.data.layouts`` owns the local half (real paths,
symlinks). A root is passed between processes as its location string: each process
opens the filesystem itself, on first use, so no AWS SDK client exists before a
DataLoader forks its workers.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, NamedTuple

from trainables.data.layouts import DataError
from trainables.data.locations import is_uri, resolve_location

_FILESYSTEMS: dict[tuple[int, str], tuple[Any, str]] = {}  # (pid, location) -> (fs, base path)


class FileEntry(NamedTuple):
    """A file under a root: what the scan cache keys on."""

    path: str  # relative to the root, posix style
    size: int
    mtime_ns: int


def _filesystem(location: str) -> tuple[Any, str]:
    """The root's pyarrow filesystem and base path, opened once per process."""
    key = (os.getpid(), location)
    if key not in _FILESYSTEMS:
        fs, base = resolve_location(location)
        _FILESYSTEMS[key] = (fs, base.rstrip("/"))
    return _FILESYSTEMS[key]


@dataclass(frozen=True)
class DataRoot:
    """A data root: an absolute local path, or a URI as given (without a trailing '/')."""

    location: str

    @classmethod
    def of(cls, location: str | os.PathLike) -> DataRoot:
        """The root at ``location``; a local path is made absolute (symlinks kept)."""
        text = os.fspath(location)
        if is_uri(text):
            return cls(text.rstrip("/"))
        return cls(os.path.abspath(text))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.location)

    def check_exists(self) -> None:
        """Raise a DataError naming the root when it is not a folder (one request for a URI)."""
        if self.is_local:
            if not os.path.isdir(self.location):
                raise DataError(f"data root {self.location!r} is not a directory; pass the image folder.")
            return
        import pyarrow.fs as pafs

        try:
            fs, base = _filesystem(self.location)
            info = fs.get_file_info(base)
        except OSError as err:
            raise DataError(f"data root {self.location!r} cannot be read ({err}); check the URI and the "
                            "credentials this process has for it (AWS_* variables, or the cloud's own).") from err
        if info.type != pafs.FileType.Directory:
            raise DataError(f"data root {self.location!r} holds no files (an object store has no empty "
                            "folders); check the bucket and prefix.")

    def list_files(self) -> list[FileEntry]:
        """Every object under a URI root, sorted, in one recursive listing (S3: 1,000 keys a
        request). Local roots are walked by ``trainables.data.layouts`` instead."""
        import pyarrow.fs as pafs

        fs, base = _filesystem(self.location)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(
            FileEntry(info.path[len(base) + 1:], info.size, info.mtime_ns or 0)
            for info in infos
            if info.type == pafs.FileType.File
        )

    def path_of(self, relpath: str) -> str:
        """How errors and logs name a file: its local path, or its full URI."""
        return f"{self.location}/{relpath}" if not self.is_local else os.path.join(self.location, relpath)

    def read_bytes(self, relpath: str) -> bytes:
        """The file's bytes; ``relpath`` was checked to lie inside the root when it was listed."""
        if self.is_local:
            with open(os.path.join(self.location, relpath), "rb") as handle:
                return handle.read()
        fs, base = _filesystem(self.location)
        with fs.open_input_stream(f"{base}/{relpath}") as stream:
            return stream.readall()


def key_inside(root: DataRoot, raw: str) -> str:
    """The relative key that ``raw`` (a manifest row: a key relative to a URI root, or a
    full URI under it) names, refusing anything that is not plainly under the root.

    Object stores do not normalise keys: ``a/../b`` is a key of its own, and an HTTP
    layer may decode ``%2E%2E`` into ``..``. So instead of normalising (which would
    change which object is read), any empty, ``.`` or ``..`` segment is refused, before
    and after percent-decoding; and a full URI must start with the root and a ``/``, so
    ``s3://b/data`` never reaches ``s3://b/data-old/x``.

    Raises:
        DataError: Naming the row's path and the rule it broke.
    """
    rel = raw
    if is_uri(raw):
        prefix = root.location + "/"
        if not raw.startswith(prefix):
            raise DataError(f"path {raw!r} is not under the data root {root.location!r}. Paths must stay "
                            "inside the root: give keys relative to it, or full URIs that start with it.")
        rel = raw[len(prefix):]
    for form in (rel, urllib.parse.unquote(rel)):
        segments = form.split("/")
        if form.startswith("/") or any(segment in ("", ".", "..") for segment in segments):
            raise DataError(f"path {raw!r} has an empty, '.' or '..' segment, or starts with '/'; under the "
                            f"data root {root.location!r} every key must name its object plainly (no '..', "
                            "no '//').")
    return rel
