"""Does one trial fit this Ray cluster? Checked once Ray is up, before the data scan and
any trial: Ray never fails a request no node can hold, it waits for one ("No available
node types can fulfill resource request"), and a search asking a 2-CPU machine for 64
CPUs a trial hung there forever.

A cluster's possible nodes are its live ones, plus the node groups its autoscaler may
start (published by Ray's v2 autoscaler). Where an autoscaler may launch node types it
does not publish (v1, KubeRay's default), the cluster may grow in ways this check cannot
see: it stays quiet, and Ray's own "No available node types" message is the signal.
"""

from __future__ import annotations

import json

from search.config import ConfigError, RunConfig

_FIELDS = {"CPU": ("search.cpus_per_trial", "CPUs"), "GPU": ("scaling.gpus_per_worker", "GPUs")}
_WORKER_FIELDS = {"CPU": ("scaling.cpus_per_worker", "CPUs"), "GPU": ("scaling.gpus_per_worker", "GPUs")}


def check_trials_fit(cfg: RunConfig, trial_resources: dict[str, float]) -> None:
    """Raise ``ConfigError`` naming the field, both numbers and the fix when no node this
    cluster has or may start can hold one trial (or one Ray Train worker of a trial).

    ``trial_resources`` is what each trial's own process asks Tune for (lower-case
    ``cpu``/``gpu`` as Tune spells them, or custom resources).
    """
    nodes = _possible_nodes()
    if nodes is None:
        return
    if cfg.scaling.num_workers > 0:
        request = {"CPU": cfg.scaling.cpus_per_worker,
                   **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}
        _check(request, nodes, _WORKER_FIELDS, "a Ray Train worker of a trial")
    else:
        request = {_RAY_NAMES.get(name, name): amount for name, amount in trial_resources.items()}
        _check(request, nodes, _FIELDS, "a trial")


_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU"}


def _check(request: dict[str, float], nodes: list[dict[str, float]], fields: dict, who: str) -> None:
    if any(all(node.get(name, 0.0) >= amount for name, amount in request.items() if amount > 0) for node in nodes):
        return
    for name, amount in request.items():
        largest = max(node.get(name, 0.0) for node in nodes)
        if amount > largest:
            field, unit = fields.get(name, (f"resource '{name}'", name))
            raise ConfigError(
                f"{field}: {who} asks for {amount:g} {unit}, but the largest node of this Ray cluster has "
                f"{largest:g}; Ray would wait for such a node forever. Set {field} to at most {largest:g}, "
                "or add a node that large.")
    raise ConfigError(f"{who} asks for {_describe(request)}, but no node of this Ray cluster has all of it at "
                      f"once (its nodes: {'; '.join(_describe(node, request) for node in nodes)}); ask for less, "
                      "or add a node that large.")


def _describe(resources: dict[str, float], only: dict[str, float] | None = None) -> str:
    return ", ".join(f"{resources.get(name, 0.0):g} {name}" for name in (only or resources))


def _possible_nodes() -> list[dict[str, float]] | None:
    """Each live node's total resources and each autoscaler node group's, or None when
    an autoscaler runs whose node types are unknown here."""
    import ray
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return nodes + [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]
    # Every Ray runs Ray's v1 autoscaler monitor. On a cluster that cannot grow (ray.init,
    # `ray start`, ray.cluster_utils) its provider is read-only: each live node is its own
    # type, named node_<id>. Any other type name is one an autoscaler may launch, with a
    # shape this status does not give (KubeRay's default).
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    types = (report.get("node_type_mapping") or {}).items()
    if any(name != f"node_{node_id}" for node_id, name in types):
        return None
    return nodes
