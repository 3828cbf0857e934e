"""Where a run lives, and the check that every node of the cluster can reach it.

Every process of a search writes into the run directory: the driver (config, split,
study, report, export) and each trial, wherever Ray placed it (records, metrics,
checkpoints). It lives in one of:

- a local directory: one machine;
- a shared filesystem mounted at the same path on every node (NFS, EFS, Filestore, a
  ReadWriteMany volume): processes write into it directly;
- an object store (``s3://``, ``gs://``, through pyarrow): each process works in a
  node-local copy and uploads what it changed (``trainables/mirror.py``).

On a multi-node cluster a local directory would scatter results over nodes and a night
of them would vanish, so the driver checks at start, before any data is scanned, that
every node reads back a token it wrote (or lists the bucket).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from search.config import ConfigError, RunConfig
from search.records import CONFIG_FILE, STATE_FILE, newest_unfinished, read_state
from search.train_job import new_run_dir, run_dir_name
from trainables.mirror import Mirror, working_copy_for



@dataclass(frozen=True)
class RunLocation:
    """A run directory as this process sees it: ``local``, and its ``mirror`` for URIs."""

    local: Path
    mirror: Mirror | None = None

    @property
    def name(self) -> str:
        """The run directory's own name (``demo-20261128-101500``): the study's name too."""
        return str(self).rstrip("/").rsplit("/", 1)[-1]

    @property
    def uri(self) -> str | None:
        return self.mirror.uri if self.mirror else None

    def __str__(self) -> str:
        return self.uri or str(self.local)

    def push(self, *rels: str) -> None:
        if self.mirror is not None:
            self.mirror.push(*rels)

    def close(self) -> None:
        """Delete this process's private view of a URI run (``open_run``); a working
        copy, or a run on a filesystem, stays."""
        if self.mirror is not None and self.local != working_copy_for(self.mirror.uri):
            shutil.rmtree(self.local, ignore_errors=True)

    def pull(self, *rels: str, metadata_only: bool = False) -> None:
        """Bring remote files into ``local``; ``metadata_only`` leaves the weights remote."""
        if self.mirror is not None:
            self.mirror.pull(*rels, skip_suffixes=(".safetensors",) if metadata_only else ())


def not_a_run(location: str | Path) -> ConfigError:
    return ConfigError(f"'{location}' is not a tunecv run directory (no {CONFIG_FILE} in it).")


def open_run(location: str) -> RunLocation:
    """An existing run, with its metadata at hand (weights stay remote until needed).

    A URI is read into a private temporary copy: ``tunecv report`` while the search
    runs must not touch the driver's working copy (``take_over`` makes that one).
    ``close()`` deletes it.

    Raises:
        ConfigError: ``location`` is not a run directory.
    """
    mirror = Mirror.for_location(location)
    if mirror is None:
        local = Path(location).resolve()
        if not (local / CONFIG_FILE).is_file():
            raise not_a_run(location)
        return RunLocation(local)
    if not mirror.exists(CONFIG_FILE):
        raise not_a_run(location)
    view = Path(tempfile.mkdtemp(prefix="tunecv-view-"))
    run = RunLocation(view, Mirror(mirror.uri, view))
    run.pull("", metadata_only=True)
    return run


def locate_run(cfg: RunConfig, run_dir: str | None) -> tuple[RunLocation, bool]:
    """Where this search's run lives, and whether it is an unfinished run to resume.

    ``run_dir`` (a path or URI) is resumed when it holds a run; without it the newest
    unfinished ``output_dir/name-*`` whose driver is gone is resumed, else a new
    directory is chosen. A run to resume comes as a view (``open_run``): its config
    and driver are checked before this process takes it over.
    """
    if run_dir is not None:
        mirror = Mirror.for_location(run_dir)
        if mirror is not None:
            return (open_run(run_dir), True) if mirror.exists(CONFIG_FILE) else (_fresh(mirror), False)
        local = Path(run_dir).resolve()
        if local.exists() and not (local / CONFIG_FILE).is_file():
            raise ConfigError(f"--run-dir '{run_dir}' exists but is not a tunecv run directory; pick another.")
        return RunLocation(local), local.exists()
    root = Mirror.for_location(cfg.output_dir)
    prefix = f"{cfg.name}-"
    if root is None:
        output_dir = Path(cfg.output_dir).resolve()
        states = {
            p.name: read_state(p) for p in output_dir.glob(f"{prefix}*") if (p / CONFIG_FILE).is_file()
        } if output_dir.is_dir() else {}
        found = newest_unfinished(states)
        return (RunLocation(output_dir / found), True) if found else (RunLocation(new_run_dir(cfg)), False)
    states = {}
    for name in root.list_dirs():
        text = root.child(name).read_text(STATE_FILE) if name.startswith(prefix) else None
        if text:
            states[name] = json.loads(text)
    found = newest_unfinished(states)
    return (open_run(root.child(found).uri), True) if found else (_fresh(root.child(run_dir_name(cfg))), False)


def _fresh(mirror: Mirror) -> RunLocation:
    shutil.rmtree(mirror.local, ignore_errors=True)
    return RunLocation(mirror.local, mirror)


def take_over(run: RunLocation) -> RunLocation:
    """The run as its driver works on it: for a URI, the view becomes this node's
    working copy (moved, not fetched again)."""
    if run.mirror is None:
        return run
    working = Mirror.for_location(run.uri)
    shutil.rmtree(working.local, ignore_errors=True)  # a stale copy must not mix in
    working.local.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run.local), str(working.local))
    return RunLocation(working.local, working)


_PROBE_TIMEOUT_S = 120.0


def _reads_token(location: str, name: str, token: str) -> bool:
    mirror = Mirror.for_location(location)
    try:
        if mirror is not None:
            return mirror.read_text(name) == token  # also proves this node's credentials
        return (Path(location) / name).read_text() == token
    except OSError:
        return False


def check_shared_storage(storage: str | Path) -> None:
    """Refuse to start a multi-node search whose storage some node cannot read.

    Args:
        storage: The directory runs go under (a path), or an object-store URI.

    Raises:
        ConfigError: Naming the nodes that cannot see ``storage`` and what to set.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return
    token = uuid.uuid4().hex
    name = f".tunecv-probe-{token}"
    mirror = Mirror.for_location(str(storage))
    if mirror is not None:
        mirror.write_text(name, token)
        location = mirror.uri
    else:
        output_dir = Path(storage).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(token)
        location = str(output_dir)
    read = ray.remote(num_cpus=0, max_retries=0)(_reads_token)
    try:
        pending = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(location, name, token)
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
        if mirror is not None:
            mirror.delete(name)
        else:
            (Path(location) / name).unlink(missing_ok=True)
    if blind:
        raise ConfigError(refusal_message(location, blind, len(nodes)))


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
