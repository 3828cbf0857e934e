"""Where a file lives: a local path, or an object-store URI (anything
``pyarrow.fs.FileSystem.from_uri`` opens), passed between processes as a plain string
and opened through ``pyarrow.fs``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` strings (object stores), False for local paths."""
    return isinstance(location, str) and bool(_URI.match(location))


def resolve_location(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path (made absolute) or a URI."""
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), Path(location).resolve().as_posix()


def ray_checkpoint(location: str | Path):
    """A ``ray.train.Checkpoint`` of a directory at ``location`` (read through pyarrow)."""
    import ray.train

    filesystem, path = resolve_location(location)
    return ray.train.Checkpoint(path=path, filesystem=filesystem)
