"""Where a run lives, and the check that every node of the cluster can reach it.

Every process of a search writes into the run directory: the driver (config, split,
study, report, export) and each trial, wherever Ray placed it (records, metrics,
checkpoints). On one machine any directory works. On a multi-node cluster it must be
one filesystem mounted at the same path on every node (NFS, EFS, Filestore, a
ReadWriteMany volume); otherwise trials on other nodes would write where the driver
never looks, and a night of results would vanish. This module checks that at start by
writing a token and reading it back from every node, before any data is scanned.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from search.config import ConfigError

_PROBE_TIMEOUT_S = 120.0


def _reads_token(path: str, token: str) -> tuple[bool, str]:
    import socket

    try:
        return Path(path).read_text() == token, socket.gethostname()
    except OSError:
        return False, socket.gethostname()


def check_shared_storage(output_dir: Path) -> None:
    """Refuse to start a multi-node search whose ``output_dir`` some node cannot read.

    Raises:
        ConfigError: Naming the nodes that cannot see ``output_dir`` and what to set.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = output_dir / f".tunecv-probe-{token}"
    probe.write_text(token)
    read = ray.remote(num_cpus=0, max_retries=0)(_reads_token)
    try:
        pending = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe), token)
            for n in nodes
        }
        blind = []
        for node, ref in pending.items():
            try:
                seen, _ = ray.get(ref, timeout=_PROBE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - any failure means "cannot confirm"
                seen = False
                node = f"{node}: {type(err).__name__}"
            if not seen:
                blind.append(node)
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise ConfigError(refusal_message(output_dir, blind, len(nodes)))


def refusal_message(output_dir: Path, blind: list[str], num_nodes: int) -> str:
    """What to tell the user when ``blind`` nodes cannot read ``output_dir``."""
    return (
        f"output_dir '{output_dir}' is not shared: {len(blind)} of {num_nodes} nodes cannot "
        f"read it ({', '.join(blind)}). Trials on those nodes would write their results "
        "where this driver never looks. Set output_dir to a filesystem mounted at the same "
        "path on every node (NFS/EFS/Filestore, a ReadWriteMany volume; see cluster/README.md), "
        "or run on one node."
    )
