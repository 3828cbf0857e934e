"""Reading and writing a run location through ``pyarrow.fs``, and the check that every
node reaches it. ``RunStore`` is the one way tunecv's own code touches a run, local or
``s3://``/``gs://``: files are written whole (a local file under a temporary name, then
renamed; an object in one upload), so a reader never meets half a file. Ray checks
only that the driver can write its storage, so before any data is scanned the driver
also writes a token that every node must read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from search.config import ConfigError, RunConfig, dump_config, parse_config
from search.layout import CONFIG, CONFIG_DIGEST, join
from trainables.data.locations import is_uri, resolve_location


@dataclass(frozen=True)
class RunStore:
    """A directory (a run, or the ``output_dir`` runs go under) at ``location``.

    Only ``location`` is pickled (stores travel to Ray tasks); the filesystem is opened
    again on first use.
    """

    location: str  # an absolute local path, or a URI without a trailing slash

    @staticmethod
    def at(location: str | Path) -> RunStore:
        text = str(location)
        return RunStore(text.rstrip("/") if is_uri(text) else Path(text).resolve().as_posix())

    def __getstate__(self) -> dict:
        return {"location": self.location}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "location", state["location"])

    @cached_property
    def _resolved(self) -> tuple[Any, str]:
        return resolve_location(self.location)

    @property
    def filesystem(self):
        """The pyarrow filesystem: what Ray's ``storage_filesystem`` takes."""
        return self._resolved[0]

    @property
    def is_local(self) -> bool:
        """A path on this machine's filesystem (maybe a shared mount), not an object store."""
        return not is_uri(self.location)

    @property
    def name(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.location

    def fs_path(self, rel: str = "") -> str:
        """``rel``'s path on ``filesystem`` (what Ray's ``storage_path`` takes with it)."""
        return join(self._resolved[1], rel)

    def uri(self, rel: str = "") -> str:
        """``rel`` as a location string another process can open (path or URI)."""
        return join(self.location, rel)

    def child(self, name: str) -> RunStore:
        return RunStore(self.uri(name))

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(self.fs_path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """The whole file. Raises FileNotFoundError when it does not exist."""
        try:
            with self.filesystem.open_input_stream(self.fs_path(rel)) as f:
                return f.readall()
        except OSError as err:  # S3 reports a missing key as OSError, not FileNotFoundError
            if not self.exists(rel):
                raise FileNotFoundError(f"{self.uri(rel)} does not exist") from err
            raise

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole: a reader sees the old content or the new, never a part."""
        if self.is_local:
            target = Path(self.fs_path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        with self.filesystem.open_output_stream(self.fs_path(rel)) as f:  # one object, one upload
            f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` whole unless it exists; True when this call created it. Local
        filesystems only: ``link(2)`` of a finished temporary file is atomic and fails on
        an existing name (NFS included), so of two callers at one instant exactly one wins."""
        if not self.is_local:
            raise ValueError(f"create_exclusive needs a local filesystem, not {self}")
        target = Path(self.fs_path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, value: Any) -> None:
        self.write_text(rel, json.dumps(value, indent=1, default=str) + "\n")

    def delete(self, rel: str) -> None:
        self.filesystem.delete_file(self.fs_path(rel))

    def list_names(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and directories); empty when it is missing."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.fs_path(rel), allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except FileNotFoundError:
            # pyarrow's local listing raises rather than honour allow_not_found when the
            # directory is created between its failed listing and its existence check (seen
            # in CI, a test polling a run a driver was creating); by now it exists.
            infos = self.filesystem.get_file_info(selector)
        return sorted(info.base_name for info in infos)

    @contextlib.contextmanager
    def local_files(self, rel: str, names: Sequence[str]) -> Iterator[Path]:
        """Directory ``rel`` on this machine with (at least) the files ``names``: a local
        store's own directory, or a temporary download of just those files, deleted on exit."""
        if self.is_local:
            yield Path(self.fs_path(rel))
            return
        with tempfile.TemporaryDirectory(prefix="tunecv-") as tmp:
            for name in names:
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(self.read_bytes(join(rel, name)))
            yield Path(tmp)

    def upload_dir(self, local: Path, rel: str) -> None:
        """Write every file under ``local`` to ``rel``, each one whole."""
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            self.write_bytes(join(rel, path.relative_to(local).as_posix()), path.read_bytes())


def read_config(store: RunStore, check_paths: bool = True) -> RunConfig:
    """The ``RunConfig`` a run was started with (its ``config.yaml``).

    ``check_paths=False`` for readers, which need no data or weights on this machine.

    Raises:
        ConfigError: ``store`` holds no run, or its config no longer validates.
    """
    if not store.exists(CONFIG):
        raise ConfigError(f"'{store}' is not a tunecv run directory (no {CONFIG} in it).")
    return parse_config(yaml.safe_load(store.read_text(CONFIG)), source=f"'{store.uri(CONFIG)}'",
                        check_paths=check_paths)


def write_config(store: RunStore, cfg: RunConfig) -> None:
    """Write the run's ``config.yaml``, then its digest, which a resume checks the file against."""
    text = dump_config(cfg)
    store.write_text(CONFIG, text)
    store.write_text(CONFIG_DIGEST, config_digest(text) + "\n")


def config_digest(text: str) -> str:
    """The sha256 of a ``config.yaml``'s text (any edit counts, a comment too)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PROBE_TIMEOUT_S = 120.0


def _reads_token(store: RunStore, name: str, token: str) -> bool:
    try:
        return store.read_text(name) == token  # for a bucket, also proves this node's credentials
    except OSError:
        return False


def check_shared_storage(store: RunStore) -> None:
    """Refuse to start a multi-node search whose storage some node cannot read.

    Args:
        store: Where runs go (``output_dir``).

    Raises:
        ConfigError: Naming the nodes that cannot see ``store`` and what to set.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return
    token = uuid.uuid4().hex
    name = f".tunecv-probe-{token}"
    store.write_text(name, token)
    read = ray.remote(num_cpus=0, max_retries=0)(_reads_token)
    try:
        pending = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(store, name, token)
            for n in nodes
        }
        blind = []
        for node, ref in pending.items():
            try:
                seen = ray.get(ref, timeout=_PROBE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any failure means "cannot confirm"
                seen = False
                node = f"{node}: {type(err).__name__}"
            if not seen:
                blind.append(node)
    finally:
        store.delete(name)
    if blind:
        raise ConfigError(refusal_message(store.location, blind, len(nodes)))


def refusal_message(output_dir: str | Path, blind: list[str], num_nodes: int) -> str:
    """What to tell the user when ``blind`` nodes cannot read ``output_dir``."""
    return (
        f"output_dir '{output_dir}' is not shared: {len(blind)} of {num_nodes} nodes cannot "
        f"read it ({', '.join(blind)}). Trials on those nodes would write their results "
        "where this driver never looks. Set output_dir to a filesystem mounted at the same "
        "path on every node (NFS/EFS/Filestore, a ReadWriteMany volume; see cluster/README.md), "
        "or to an object store every node can reach (s3://bucket/runs, gs://bucket/runs), "
        "or run on one node."
    )


class RunStorageFullError(RuntimeError):
    """The run's filesystem ran out of space (or quota); the run stops, resumable."""


def out_of_space(err: BaseException | None) -> BaseException | None:
    """The ENOSPC/EDQUOT ``OSError`` (or ``RunStorageFullError``) behind ``err``, wherever
    it was raised (``trainables.errors.nested_errors``)."""
    import errno

    from trainables.errors import nested_errors

    return next((e for e in nested_errors(err) if isinstance(e, RunStorageFullError)
                 or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))), None)
