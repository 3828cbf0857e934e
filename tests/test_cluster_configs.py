"""The cluster files (cluster/, configs/cluster.yaml) agree with the code and each other.

Fast and offline: nothing here starts Ray, reaches a cluster or reads data (the data
paths exist only on the cluster). Checked: each file parses; each entrypoint, in a
RayJob or in a documented `ray job submit`, is a `tunecv run` of a run file that
validates; a search at full concurrency fits the GPUs and CPUs the clusters can give;
the head trains nothing; token auth stays on and the dashboard stays private; every
node mounts the shared filesystem the run directory lives on.
"""

from __future__ import annotations

import argparse
import json
import shlex
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.runtime_env import RuntimeEnv

from search.cli import build_parser
from search.config import RunConfig
from trainables.config import ScalingConfig

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "cluster-launcher.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay-raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
CLUSTER_RUN = REPO / "configs" / "cluster.yaml"
KUBERAY = [RAYCLUSTER, RAYJOB]
SHARED = Path("/mnt/shared")  # where every node mounts the shared filesystem


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _run_config() -> RunConfig:
    return RunConfig.model_validate(_load(CLUSTER_RUN))


def _cluster_spec(manifest: dict) -> dict:
    """The RayClusterSpec of a RayCluster or of a RayJob's own cluster."""
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _tunecv_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``python -m search.cli ...`` as the tunecv CLI would."""
    assert argv[:3] == ["python", "-m", "search.cli"], f"not a tunecv entrypoint: {argv}"
    return build_parser().parse_args(argv[3:])


def _documented_submits(path: Path) -> list[list[str]]:
    """The ``ray job submit ...`` commands shown in a file's comments, as argv lists."""
    lines = (line.strip().lstrip("#").strip() for line in path.read_text().splitlines())
    return [shlex.split(line) for line in lines if line.startswith("ray job submit")]


def _gpus_needed(cfg: RunConfig) -> float:
    """GPUs a search holds at full concurrency: trials x DDP workers x GPUs per worker."""
    s = cfg.scaling
    if not s.use_gpu:
        return 0.0
    return cfg.search.max_concurrent_trials * max(s.num_workers, 1) * s.gpus_per_worker


def _cpus_fit(node_cpus: float, node_gpus: float, scaling: ScalingConfig) -> bool:
    """Whether a node has the CPUs for as many DDP workers as its GPUs can take."""
    workers = node_gpus // scaling.gpus_per_worker if scaling.gpus_per_worker else 0
    return workers * scaling.cpus_per_worker <= node_cpus


def _launcher_worker_types(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def _launcher_gpus(cluster: dict) -> float:
    """GPUs the launcher can start: max_workers x GPUs over the worker node types."""
    types = _launcher_worker_types(cluster).values()
    return sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in types)


def _kuberay_gpus(spec: dict) -> float:
    """GPUs KubeRay can start: maxReplicas x num-gpus over the worker groups."""
    groups = spec["workerGroupSpecs"]
    return sum(g["maxReplicas"] * float(g["rayStartParams"].get("num-gpus", 0)) for g in groups)


def _ray_container(pod_spec: dict) -> dict:
    return pod_spec["containers"][0]  # KubeRay runs Ray in the first container


def _cpu_quantity(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _group_cpus(group: dict) -> float:
    """A worker group's Ray CPUs: num-cpus if given, else KubeRay's default, the CPU limit."""
    limit = _ray_container(group["template"]["spec"])["resources"]["limits"]["cpu"]
    return _cpu_quantity(group["rayStartParams"].get("num-cpus", limit))


def _ray_start_flags(command: str) -> dict[str, str | bool]:
    """The ``--flag[=value]`` options of the ``ray start`` in a shell command line."""
    argv = shlex.split(command.split("ray start", 1)[1])
    flags: dict[str, str | bool] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            name, _, value = token.partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            flags[name] = value or (following if not following.startswith("--") else True)
    return flags


def _ray_start(commands: list[str]) -> str:
    (command,) = [c for c in commands if "ray start" in c]
    return command


# --- every file parses, every entrypoint is a valid `tunecv run` ---------------------


@pytest.mark.parametrize(
    "path", [LAUNCHER, RAYCLUSTER, RAYJOB, RUNTIME_ENV, CLUSTER_RUN], ids=lambda p: p.name
)
def test_file_parses_to_a_mapping(path):
    assert isinstance(_load(path), dict)


@pytest.mark.parametrize(
    "path, kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["raycluster", "rayjob"]
)
def test_kuberay_manifest_is_ray_io_v1(path, kind):
    manifest = _load(path)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)


def test_cluster_run_config_validates():
    cfg = _run_config()  # raises on any unknown key or bad value; paths are only on the cluster
    assert cfg.search.max_failures >= 1, "a search on many nodes should retry a crashed trial"


def test_cluster_run_dirs_are_on_the_shared_mount():
    cfg = _run_config()
    # Every node mounts /mnt/shared; a relative path would land in the job's temporary copy.
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.output_dir).is_relative_to(SHARED)
    assert Path(cfg.data.root).is_relative_to(SHARED)


def test_rayjob_entrypoint_runs_a_search_of_an_existing_run_file():
    args = _tunecv_args(shlex.split(_load(RAYJOB)["spec"]["entrypoint"]))
    assert args.command == "run"
    assert (REPO / args.config).resolve() == CLUSTER_RUN  # the image's WORKDIR /app is the repo root


@pytest.mark.parametrize("path", [RUNTIME_ENV, LAUNCHER, RAYCLUSTER, CLUSTER_RUN], ids=lambda p: p.name)
def test_documented_submit_runs_a_search_with_files_that_exist(path):
    submits = _documented_submits(path)
    assert submits, f"{path.name} documents no `ray job submit` command"
    for argv in submits:
        split = argv.index("--")
        submit, entrypoint = argv[:split], argv[split + 1:]
        assert (REPO / submit[submit.index("--runtime-env") + 1]).is_file()
        args = _tunecv_args(entrypoint)
        assert args.command == "run" and (REPO / args.config).is_file()


def test_entrypoint_check_tells_train_from_run():
    args = _tunecv_args(shlex.split("python -m search.cli train --config configs/cluster.yaml"))
    assert args.command != "run"
    with pytest.raises(AssertionError, match="not a tunecv entrypoint"):
        _tunecv_args(shlex.split("python train.py --config configs/cluster.yaml"))


# --- resources: a full-concurrency search fits, the head trains nothing ---------------


def _gpu_supply(path: Path) -> float:
    data = _load(path)
    return _launcher_gpus(data) if path == LAUNCHER else _kuberay_gpus(_cluster_spec(data))


@pytest.mark.parametrize("path", [LAUNCHER, *KUBERAY], ids=lambda p: p.name)
def test_search_at_full_concurrency_fits_the_cluster_gpus(path):
    needed, supply = _gpus_needed(_run_config()), _gpu_supply(path)
    assert 0 < needed <= supply, f"the search needs {needed} GPUs, {path.name} gives at most {supply}"


def test_gpu_check_rejects_one_gpu_too_many():
    cfg = _run_config()
    supply = _gpu_supply(LAUNCHER)
    too_many = cfg.model_copy(update={
        "scaling": cfg.scaling.model_copy(update={"num_workers": 1, "gpus_per_worker": 1.0}),
        "search": cfg.search.model_copy(update={"max_concurrent_trials": int(supply) + 1}),
    })
    assert _gpus_needed(too_many) == supply + 1 > supply


def test_launcher_type_limits_bind_not_the_global_max_workers():
    cluster = _load(LAUNCHER)
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in _launcher_worker_types(cluster).values())


def test_launcher_worker_types_have_cpus_for_their_gpus():
    scaling = _run_config().scaling
    for name, node in _launcher_worker_types(_load(LAUNCHER)).items():
        res = node["resources"]
        assert _cpus_fit(res["CPU"], res["GPU"], scaling), f"{name}: {res} for {scaling}"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_worker_groups_have_cpus_for_their_gpus(path):
    scaling = _run_config().scaling
    for group in _cluster_spec(_load(path))["workerGroupSpecs"]:
        gpus = float(group["rayStartParams"]["num-gpus"])
        assert _cpus_fit(_group_cpus(group), gpus, scaling), group["groupName"]


def test_cpu_check_rejects_one_cpu_too_few():
    scaling = ScalingConfig(num_workers=2, use_gpu=True, cpus_per_worker=4, gpus_per_worker=1)
    assert _cpus_fit(16, 4, scaling)
    assert not _cpus_fit(15, 4, scaling)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_gpu_limit_matches_num_gpus(path):
    for group in _cluster_spec(_load(path))["workerGroupSpecs"]:
        limits = _ray_container(group["template"]["spec"])["resources"]["limits"]
        num_gpus = float(group["rayStartParams"]["num-gpus"])
        assert float(limits["nvidia.com/gpu"]) == num_gpus, group["groupName"]


def test_launcher_head_has_no_gpu():
    cluster = _load(LAUNCHER)
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["GPU"] == 0


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_takes_no_ray_work(path):
    head = _cluster_spec(_load(path))["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    limits = _ray_container(head["template"]["spec"])["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in limits


# --- access: token auth on, dashboard private ------------------------------------------


def test_launcher_matches_rays_cluster_schema():
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(_load(LAUNCHER), schema)  # unknown keys and wrong types are errors


def test_launcher_dashboard_listens_on_loopback_only():
    flags = _ray_start_flags(_ray_start(_load(LAUNCHER)["head_start_ray_commands"]))
    assert flags["--head"] is True
    assert flags["--dashboard-host"] == "127.0.0.1"


def test_ray_start_flags_reads_both_flag_forms():
    flags = _ray_start_flags("ulimit -n 1; ray start --head --dashboard-host 0.0.0.0 --port=6379")
    assert flags == {"--head": True, "--dashboard-host": "0.0.0.0", "--port": "6379"}


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_starts_ray_with_token_auth(key):
    assert "RAY_AUTH_MODE=token ray start" in _ray_start(_load(LAUNCHER)[key])


def test_launcher_gives_every_node_the_auth_token():
    assert any(remote.endswith("/.ray/auth_token") for remote in _load(LAUNCHER)["file_mounts"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_keeps_token_auth_on(path):
    spec = _cluster_spec(_load(path))
    assert spec["authOptions"]["mode"] == "token"
    version = tuple(int(part) for part in spec["rayVersion"].split("."))
    assert version >= (2, 52, 0), "Ray token auth needs Ray 2.52 or later"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_service_stays_inside_the_cluster(path):
    head = _cluster_spec(_load(path))["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert not head.get("enableIngress", False)


def _dashboard_host(path: Path) -> str:
    return _cluster_spec(_load(path))["headGroupSpec"]["rayStartParams"]["dashboard-host"]


def test_kuberay_dashboard_hosts():
    # A standing cluster's dashboard is reached by port-forward only; a RayJob's must
    # listen on the pod IP because KubeRay submits the job and polls it through it.
    assert _dashboard_host(RAYCLUSTER) == "127.0.0.1"
    assert _dashboard_host(RAYJOB) == "0.0.0.0"


def test_rayjob_cluster_is_the_standing_cluster():
    standing, job = _cluster_spec(_load(RAYCLUSTER)), _cluster_spec(_load(RAYJOB))
    for spec in (standing, job):
        del spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]  # differs on purpose, see above
    assert job == standing


# --- shared storage ----------------------------------------------------------------------


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_kuberay_pod_mounts_the_shared_claim(path):
    spec = _cluster_spec(_load(path))
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in (g["template"]["spec"] for g in groups):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in _ray_container(pod)["volumeMounts"]}
        assert claims.get(mounts.get(str(SHARED))) == "tunecv-shared", _ray_container(pod)["name"]


def test_launcher_mounts_the_shared_filesystem_before_ray_starts():
    setup = _load(LAUNCHER)["setup_commands"]  # setup runs on every node before `ray start`
    assert any(" mount " in f" {c} " and c.rstrip().endswith(str(SHARED)) for c in setup)


# --- runtime env ---------------------------------------------------------------------------


def test_runtime_env_is_accepted_by_ray():
    RuntimeEnv(**_load(RUNTIME_ENV))  # Ray's own checks, e.g. env_vars must be Dict[str, str]


def test_runtime_env_ships_code_not_data_or_dependencies():
    env = _load(RUNTIME_ENV)
    assert env["working_dir"] == "."
    assert {".venv", "data", "runs"} <= set(env["excludes"])
    assert not {"pip", "conda", "uv"} & env.keys(), "dependencies come with the cluster image"


def test_runtime_env_vars_are_strings():
    env_vars = _load(RUNTIME_ENV)["env_vars"]
    assert env_vars["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(v, str) for v in env_vars.values()), env_vars


def test_rayjob_runtime_env_is_the_submit_one_without_the_upload():
    job_env = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**job_env)
    assert "working_dir" not in job_env  # the code is in the image at /app
    assert job_env["env_vars"] == _load(RUNTIME_ENV)["env_vars"]


def test_rayjob_cleans_up_after_the_search():
    spec = _load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    # The deadline is a backstop; it must not cut the search's own time budget.
    assert spec["activeDeadlineSeconds"] > _run_config().search.time_budget_s


def test_dockerfile_image_matches_the_manifests():
    """The KubeRay image is built from cluster/Dockerfile: same Ray as the manifests, and
    the repository at /app, the RayJob entrypoint's working directory."""
    import re

    text = (REPO / "cluster" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM rayproject/ray:(\S+)", text, flags=re.M)
    ray_version = yaml.safe_load((REPO / "cluster" / "kuberay-raycluster.yaml").read_text())["spec"]["rayVersion"]
    assert base.startswith(f"{ray_version}-") and "gpu" in base
    assert re.search(r"^WORKDIR /app$", text, flags=re.M)
    for needed in ("search", "trainables", "spaces", "configs"):  # what the entrypoint imports and reads
        assert re.search(rf"^COPY .*\b{needed} \./{needed}$", text, flags=re.M), needed
