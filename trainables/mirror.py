"""A directory kept in an object store (s3://, gs://, ... through pyarrow) with a local copy.

Object stores have no appends, renames or shared mounts, so processes never write into
them directly: each works in a node-local copy and pushes what it changed; a process
that needs another's files pulls them. Local paths need none of this, and for them
``Mirror.for_location`` returns ``None``, so callers write ``if mirror: mirror.push(...)``.
Only strings cross process boundaries (the filesystem is opened lazily), so a mirror
travels inside Ray task and Train worker configs.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_STAGED = ".staged"  # <dir>.staged: a directory's replacement while it uploads
_COMPLETE = ".complete"  # written last into <dir>.staged: the replacement is whole
_PULL_ATTEMPTS = 4  # reads of a directory whose files vanish: a replace settles within them
_RETRY_S = 0.5


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


def working_copy_for(uri: str) -> Path:
    """This node's working copy of ``uri`` (same on every node with the same home)."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "tunecv" / "runs" / f"{tail}-{digest}"


@dataclass(frozen=True)
class Mirror:
    """``uri`` in an object store, and this process's working copy ``local``."""

    uri: str
    local: Path

    def __getstate__(self) -> dict:  # the opened filesystem stays behind
        return {"uri": self.uri, "local": self.local}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @staticmethod
    def for_location(location: str | Path) -> Mirror | None:
        """A mirror for a URI, or None for a local (or shared-filesystem) path."""
        if not is_uri(location):
            return None
        uri = str(location).rstrip("/")
        return Mirror(uri, working_copy_for(uri))

    @cached_property
    def _fs(self):
        import pyarrow.fs as pafs

        return pafs.FileSystem.from_uri(self.uri)  # (filesystem, base path)

    def _remote(self, rel: str) -> str:
        base = self._fs[1]
        return f"{base}/{rel}" if rel else base

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._fs[0].get_file_info(self._remote(rel)).type != pafs.FileType.NotFound

    def push(self, *rels: str) -> None:
        """Upload files or whole directories (relative to the run) that exist locally.

        A directory (a checkpoint) is replaced so that a complete copy always exists:
        it is uploaded to ``<rel>.staged`` and marked complete there, then copied over
        ``<rel>`` inside the store, then the staged copy goes. A crash at any point
        leaves the old or the new checkpoint whole, and ``pull`` picks the newer one.
        """
        import pyarrow.fs as pafs

        fs, _ = self._fs
        local_fs = pafs.LocalFileSystem()
        for rel in rels:
            source = self.local / rel
            if not source.exists():
                continue
            if source.is_file():
                target = self._remote(rel)
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(source), target, source_filesystem=local_fs, destination_filesystem=fs)
                continue
            staged = self._remote(rel + _STAGED)
            fs.delete_dir_contents(staged, missing_dir_ok=True)
            names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
            for name in names:
                fs.create_dir(f"{staged}/{name}".rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(source / name), f"{staged}/{name}", source_filesystem=local_fs,
                                destination_filesystem=fs)
            with fs.open_output_stream(f"{staged}/{_COMPLETE}") as f:
                f.write(b"")
            final = self._remote(rel)
            fs.delete_dir_contents(final, missing_dir_ok=True)
            for name in names:
                fs.create_dir(f"{final}/{name}".rsplit("/", 1)[0], recursive=True)
                fs.copy_file(f"{staged}/{name}", f"{final}/{name}")
            fs.delete_dir(staged)

    def pull(self, *rels: str, skip_suffixes: Iterable[str] = ()) -> None:
        """Download files or directories that exist remotely, replacing local copies.

        Every directory inside what is pulled (the whole run, a trial, a checkpoint)
        is read as ``push`` left it whole: from its complete ``.staged`` replacement
        when one exists. Two processes pulling the same remote state therefore see
        the same checkpoints, whatever level each pulls from.

        A pull that overlaps a writer (``tunecv report`` during a search) can find a
        file gone: its directory is being replaced. That directory alone is then read
        again. Such a pull can still get two versions of one checkpoint if a whole
        replace falls between listing and reading; pulls of a run whose writers are
        gone (resume, report after the search) cannot.

        Args:
            skip_suffixes: File endings to leave remote, e.g. ``.safetensors`` when
                only metadata is needed.
        """
        for rel in rels:
            self._pull(rel, tuple(skip_suffixes), _PULL_ATTEMPTS)

    def _pull(self, rel: str, skip: tuple[str, ...], attempts: int) -> None:
        try:
            files = self._whole_files(rel)
        except OSError:  # a directory deleted while it was being listed
            if attempts <= 1:
                raise
            time.sleep(_RETRY_S)
            return self._pull(rel, skip, attempts - 1)
        again: set[str] = set()
        for remote, local_rel, unit in files:
            if local_rel.endswith(skip) or unit in again:
                continue
            try:
                self._download(remote, local_rel)
            except OSError:  # S3 says RESOURCE_NOT_FOUND, local filesystems FileNotFoundError
                if attempts <= 1:
                    raise
                again.add(unit)
        for unit in sorted(again):
            time.sleep(_RETRY_S)  # let the writer finish its replace
            self._pull(unit, skip, attempts - 1)

    def _download(self, remote: str, local_rel: str) -> None:
        import pyarrow.fs as pafs

        target = self.local / local_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")  # streamed, then renamed whole
        pafs.copy_files(remote, str(tmp), source_filesystem=self._fs[0], destination_filesystem=pafs.LocalFileSystem())
        tmp.replace(target)

    def _whole_files(self, rel: str) -> list[tuple[str, str, str]]:
        """(remote path, path in the run, unit) of each file that makes up ``rel``.

        A directory ``D`` with a complete ``D.staged`` is taken from the staged copy
        (``D`` itself may be half replaced); an incomplete ``.staged`` is ignored.
        A file's unit is what to read again if the file vanishes: the directory a
        push replaces (one with a ``.staged`` beside it), else its own directory.
        """
        import pyarrow.fs as pafs

        fs, _ = self._fs
        info = fs.get_file_info(self._remote(rel))
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            return [(info.path, rel, rel)]
        if rel and self.exists(f"{rel}{_STAGED}/{_COMPLETE}"):
            info = fs.get_file_info(self._remote(rel + _STAGED))
        prefix = info.path.rstrip("/") + "/"
        listed = {
            f.path[len(prefix):]: f.path
            for f in fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
            if f.type == pafs.FileType.File
        }
        # Directories with a .staged beside them: complete ones are read from it.
        staging = {d for name in listed for d in _staged_dirs(name)}
        replaced = {d for d in staging if f"{d}{_STAGED}/{_COMPLETE}" in listed}
        files = []
        for name, remote in listed.items():
            if name.rpartition("/")[2] == _COMPLETE:
                continue
            on_path = _staged_dirs(name)
            if on_path:  # the innermost staged directory decides
                directory = on_path[-1]
                if directory not in replaced:
                    continue  # still uploading: the directory itself is whole
                name = directory + name[len(directory) + len(_STAGED):]
            elif any(name.startswith(d + "/") for d in replaced):
                continue  # the staged copy stands in for this directory
            unit = max((d for d in staging if name.startswith(d + "/")), key=len, default=name.rpartition("/")[0] or name)
            files.append((remote, _join(rel, name), _join(rel, unit)))
        return files

    def read_text(self, rel: str) -> str | None:
        """A small remote file's text, or None when it does not exist."""
        if not self.exists(rel):
            return None
        with self._fs[0].open_input_stream(self._remote(rel)) as f:
            return f.readall().decode()

    def write_text(self, rel: str, text: str) -> None:
        fs = self._fs[0]
        fs.create_dir(self._remote(rel).rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(self._remote(rel)) as f:
            f.write(text.encode())

    def delete(self, rel: str) -> None:
        self._fs[0].delete_file(self._remote(rel))

    def list_dirs(self) -> list[str]:
        """Names of the directories directly under ``uri``."""
        import pyarrow.fs as pafs

        fs, base = self._fs
        if not self.exists():
            return []
        return [
            f.base_name for f in fs.get_file_info(pafs.FileSelector(base, recursive=False))
            if f.type == pafs.FileType.Directory
        ]

    def child(self, name: str) -> Mirror:
        """The mirror of ``uri/name`` (for run directories under an output URI)."""
        uri = f"{self.uri}/{name}"
        return Mirror(uri, working_copy_for(uri))


def _staged_dirs(name: str) -> list[str]:
    """The directories with a ``.staged`` replacement on the path ``name``."""
    parts = name.split("/")
    return ["/".join(parts[: i + 1])[: -len(_STAGED)] for i, part in enumerate(parts[:-1]) if part.endswith(_STAGED)]


def _join(rel: str, name: str) -> str:
    return "/".join(p for p in (rel, name) if p)
