"""The scheduled-retraining files agree with the code, each other and the cluster files.

Fast and offline, like tests/test_cluster_configs.py (whose helpers it reuses): nothing
here starts Ray or reaches a cluster. Checked, for the two Kubernetes schedules
(cluster/retrain-raycronjob.yaml, cluster/retrain-cronjob.yaml) and the workstation one
(cluster/retrain.timer + retrain.service): every document parses; every scheduled RayJob
runs `tunecv retrain` of a run file that validates, on the cluster of kuberay-rayjob.yaml
(image, token auth, the shared claim on every Ray pod); the schedules are cron strings;
overlapping ticks are refused by the schedule itself (CronJob: Forbid; RayCronJob, which
has no concurrency policy: a deadline well inside the schedule's period); the retrain
run files keep their runs and snapshots where every node sees them.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from ray.runtime_env import RuntimeEnv

from search.cli import build_parser
from search.config import RunConfig
from tests.test_cluster_configs import (
    CLUSTER_RUN, RAYJOB, REPO, RUNTIME_ENV, SHARED, _cluster_spec, _ray_container, _tunecv_args,
)

RAYCRONJOB = REPO / "cluster" / "retrain-raycronjob.yaml"
CRONJOB = REPO / "cluster" / "retrain-cronjob.yaml"
TIMER = REPO / "cluster" / "retrain.timer"
SERVICE = REPO / "cluster" / "retrain.service"
RETRAIN_RUN = REPO / "configs" / "retrain.yaml"
RETRAIN_LOCAL = REPO / "configs" / "retrain-local.yaml"
DEMO_RUN = REPO / "configs" / "demo.yaml"
IMAGE = "tunecv:latest"
CLAIM = "tunecv-shared"
# RayCronJobSpec's fields in ray-project/kuberay (ray-operator/apis/ray/v1/raycronjob_types.go,
# CRD ray.io_raycronjobs.yaml) as of KubeRay 1.6; 1.7 adds timeZone. No concurrencyPolicy.
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend"}


def _docs(path: Path) -> list[dict]:
    """The YAML documents of a file, empty ones (a comment-only header) left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _configmap_rayjob() -> dict:
    """The RayJob the CronJob's pod creates, from its ConfigMap."""
    return yaml.safe_load(_kind(CRONJOB, "ConfigMap")["data"]["rayjob.yaml"])


def _scheduled_rayjobs() -> dict[str, tuple[dict, str]]:
    """Each schedule's RayJob (as a RayJob manifest) with the cron string that starts it."""
    cron = _kind(RAYCRONJOB, "RayCronJob")
    return {
        "raycronjob": ({"kind": "RayJob", "spec": cron["spec"]["jobTemplate"]}, cron["spec"]["schedule"]),
        "cronjob": (_configmap_rayjob(), _kind(CRONJOB, "CronJob")["spec"]["schedule"]),
    }


SCHEDULED = ["raycronjob", "cronjob"]


def _rayjob(which: str) -> dict:
    return _scheduled_rayjobs()[which][0]


def _schedule(which: str) -> str:
    return _scheduled_rayjobs()[which][1]


def _ray_pods(rayjob: dict) -> list[dict]:
    spec = _cluster_spec(rayjob)
    return [g["template"]["spec"] for g in (spec["headGroupSpec"], *spec["workerGroupSpecs"])]


def _retrain_config(path: Path) -> RunConfig:
    return RunConfig.model_validate(yaml.safe_load(path.read_text()))


# --- cron strings: parsed here, no cron library in the environment -----------------------

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week


def _cron_values(field: str, lo: int, hi: int) -> set[int]:
    """The values one numeric cron field selects (``*``, ``a``, ``a-b``, ``x/step``, lists)."""
    values: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            start, end = (int(x) for x in base.split("-"))
        else:
            start = end = int(base)
            if step_text:
                end = hi
        if not (lo <= start <= end <= hi) or step < 1:
            raise ValueError(f"cron field {field!r} outside {lo}-{hi}")
        values.update(range(start, end + 1, step))
    return values


def _parse_cron(expr: str) -> list[set[int]]:
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r} has {len(fields)} fields, not 5")
    parsed = [_cron_values(f, lo, hi) for f, (lo, hi) in zip(fields, _CRON_RANGES)]
    parsed[4] = {d % 7 for d in parsed[4]}  # 7 is Sunday too
    return parsed


def _cron_ticks(expr: str, start: datetime, days: int) -> list[datetime]:
    minutes, hours, doms, months, dows = _parse_cron(expr)
    dom_any, dow_any = expr.split()[2] == "*", expr.split()[4] == "*"
    ticks = []
    for n in range(days * 24 * 60):
        t = start + timedelta(minutes=n)
        dom_ok, dow_ok = t.day in doms, (t.weekday() + 1) % 7 in dows
        # cron: with both day fields restricted, either one matching is enough
        day_ok = (dom_ok and dow_ok) if dom_any or dow_any else (dom_ok or dow_ok)
        if t.minute in minutes and t.hour in hours and t.month in months and day_ok:
            ticks.append(t)
    return ticks


def _min_period_s(expr: str) -> float:
    """The shortest time between two ticks of a cron schedule, over a year."""
    ticks = _cron_ticks(expr, datetime(2025, 1, 1), 366)
    assert len(ticks) >= 2, f"{expr!r} ticks fewer than twice a year"
    return min((b - a).total_seconds() for a, b in zip(ticks, ticks[1:]))


def test_cron_parser_tells_periods_and_rejects_bad_strings():
    assert _min_period_s("0 3 * * 1") == 7 * 86400
    assert _min_period_s("0 3 * * *") == 86400
    assert _min_period_s("*/15 * * * *") == 900
    assert _min_period_s("0 3 1,15 * *") == 14 * 86400  # 15 Feb to 1 Mar, 2025
    for bad in ("0 3 * *", "61 * * * *", "0 3 * * 8", "0 3 * * 1 2025"):
        with pytest.raises(ValueError):
            _parse_cron(bad)


# --- every file parses -------------------------------------------------------------------


@pytest.mark.parametrize("path", [RAYCRONJOB, CRONJOB], ids=lambda p: p.name)
def test_every_manifest_document_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) and d["apiVersion"] and d["kind"] for d in docs)


def test_raycronjob_file_is_one_ray_io_v1_raycronjob():
    (doc,) = _docs(RAYCRONJOB)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")


def test_cronjob_file_holds_the_cronjob_its_rbac_and_its_rayjob():
    kinds = {d["kind"]: d["apiVersion"] for d in _docs(CRONJOB)}
    assert kinds == {
        "ServiceAccount": "v1", "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1", "ConfigMap": "v1", "CronJob": "batch/v1",
    }
    rayjob = _configmap_rayjob()
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")


@pytest.mark.parametrize("path", [RETRAIN_RUN, RETRAIN_LOCAL], ids=lambda p: p.name)
def test_retrain_run_file_validates_with_a_retrain_section(path):
    cfg = _retrain_config(path)  # unknown keys and bad values raise; paths are not checked
    assert cfg.retrain is not None and cfg.retrain.model_name == "digits"


# --- the RayCronJob: only KubeRay's fields ----------------------------------------------------


def test_raycronjob_uses_only_fields_kuberay_has():
    spec = _kind(RAYCRONJOB, "RayCronJob")["spec"]
    assert set(spec) <= RAYCRONJOB_FIELDS, f"not RayCronJobSpec fields: {set(spec) - RAYCRONJOB_FIELDS}"
    assert spec["suspend"] is False
    # jobTemplate is a RayJobSpec itself, not a {metadata, spec} template as in a CronJob.
    assert "entrypoint" in spec["jobTemplate"] and "spec" not in spec["jobTemplate"]


def test_raycronjob_documents_how_overlap_is_refused_without_a_concurrency_policy():
    assert "concurrencyPolicy" not in _kind(RAYCRONJOB, "RayCronJob")["spec"]  # the CRD has none
    comments = " ".join(line for line in RAYCRONJOB.read_text().splitlines() if line.lstrip().startswith("#"))
    for named in ("concurrencyPolicy", "activeDeadlineSeconds", "lock"):
        assert named in comments, f"the header should explain the overlap guard ({named})"


# --- every scheduled RayJob -------------------------------------------------------------------


@pytest.mark.parametrize("which", SCHEDULED)
def test_schedule_is_a_five_field_cron_string(which):
    schedule = _schedule(which)
    assert isinstance(schedule, str) and len(schedule.split()) == 5
    _parse_cron(schedule)


@pytest.mark.parametrize("which", SCHEDULED)
def test_every_container_runs_the_tunecv_image(which):
    containers = [c for pod in _ray_pods(_rayjob(which)) for c in pod["containers"]]
    assert len(containers) >= 2  # a head and at least one worker group
    assert {c["image"] for c in containers} == {IMAGE}


@pytest.mark.parametrize("which", SCHEDULED)
def test_entrypoint_retrains_with_a_run_file_that_validates(which):
    args = _tunecv_args(shlex.split(_rayjob(which)["spec"]["entrypoint"]))
    assert args.command == "retrain"
    path = REPO / args.config  # the image's WORKDIR /app is the repository root
    assert path.resolve() == RETRAIN_RUN
    assert _retrain_config(path).retrain is not None


@pytest.mark.parametrize("which", SCHEDULED)
def test_every_ray_pod_mounts_the_shared_claim(which):
    for pod in _ray_pods(_rayjob(which)):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in _ray_container(pod).get("volumeMounts", [])}
        assert claims.get(mounts.get(str(SHARED))) == CLAIM, _ray_container(pod)["name"]


@pytest.mark.parametrize("which", SCHEDULED)
def test_token_auth_stays_on(which):
    spec = _cluster_spec(_rayjob(which))
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= (2, 52, 0)
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


@pytest.mark.parametrize("which", SCHEDULED)
def test_cluster_is_the_one_of_kuberay_rayjob(which):
    # Same sizes, image, auth, dashboard host and mounts as the hand-started search.
    assert _cluster_spec(_rayjob(which)) == _cluster_spec(yaml.safe_load(RAYJOB.read_text()))


def test_both_schedules_start_the_same_rayjob():
    assert _configmap_rayjob()["spec"] == _rayjob("raycronjob")["spec"]


@pytest.mark.parametrize("which", SCHEDULED)
def test_runtime_env_is_the_submit_one_plus_the_registry(which):
    env = yaml.safe_load(_rayjob(which)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own checks
    assert "working_dir" not in env  # the code is in the image
    env_vars = dict(env["env_vars"])
    uri = urlparse(env_vars.pop("MLFLOW_TRACKING_URI"))
    assert uri.scheme in {"http", "https"} and uri.hostname
    assert env_vars == yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    # registry_uri null is what lets the environment's MLFLOW_TRACKING_URI decide.
    assert _retrain_config(RETRAIN_RUN).retrain.registry_uri is None


@pytest.mark.parametrize("which", SCHEDULED)
def test_rayjob_cleans_up_and_outlives_the_longest_retrain(which):
    spec = _rayjob(which)["spec"]
    cfg = _retrain_config(RETRAIN_RUN)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # The first retrain of a model is the full search; later ones the retrain budget.
    longest = max(cfg.search.time_budget_s, cfg.retrain.time_budget_s or 0)
    assert spec["activeDeadlineSeconds"] > longest


@pytest.mark.parametrize("which", SCHEDULED)
def test_a_retrain_is_stopped_before_the_next_tick(which):
    """The RayCronJob's only overlap guard besides the lock (it has no concurrency
    policy); for the CronJob a second one behind Forbid."""
    spec = _rayjob(which)["spec"]
    attempts = spec.get("backoffLimit", 0) + 1
    assert attempts * spec["activeDeadlineSeconds"] < _min_period_s(_schedule(which))


def test_both_schedules_tick_together():
    assert _schedule("raycronjob") == _schedule("cronjob")


# --- the CronJob: Forbid, and a pod that waits for its RayJob --------------------------------


def test_cronjob_forbids_overlapping_ticks():
    spec = _kind(CRONJOB, "CronJob")["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1


def test_cronjob_job_is_never_retried_and_outlasts_its_rayjob():
    job = _kind(CRONJOB, "CronJob")["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a retry would create a second RayJob
    rayjob = _configmap_rayjob()["spec"]
    # Forbid guards only while the Job is active: it must not end before its RayJob can.
    assert job["activeDeadlineSeconds"] > (rayjob.get("backoffLimit", 0) + 1) * rayjob["activeDeadlineSeconds"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def _cronjob_pod() -> dict:
    return _kind(CRONJOB, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _cronjob_script() -> str:
    (container,) = _cronjob_pod()["containers"]
    return " ".join([*container.get("command", []), *container.get("args", [])])


def test_cronjob_pod_creates_the_mounted_rayjob_and_waits_for_it():
    pod = _cronjob_pod()
    (container,) = pod["containers"]
    configmap = _kind(CRONJOB, "ConfigMap")
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    (mount,) = [m for m in container["volumeMounts"] if volumes.get(m["name"]) == configmap["metadata"]["name"]]
    (key,) = configmap["data"]
    script = _cronjob_script()
    # `kubectl create`, not apply: only create honours generateName, a new RayJob a tick.
    assert re.search(rf"kubectl create -f {re.escape(mount['mountPath'])}/{re.escape(key)}\b", script)
    assert "kubectl apply" not in script
    assert "jobDeploymentStatus" in script and "sleep" in script  # waits, so Forbid sees it running


def test_configmap_rayjob_is_named_anew_at_each_tick():
    metadata = _configmap_rayjob()["metadata"]
    assert metadata["generateName"].endswith("-") and "name" not in metadata


def test_cronjob_pod_may_create_and_read_rayjobs_only():
    account = _cronjob_pod()["serviceAccountName"]
    assert _kind(CRONJOB, "ServiceAccount")["metadata"]["name"] == account
    role, binding = _kind(CRONJOB, "Role"), _kind(CRONJOB, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) == {"create", "get"}


# --- the retrain run files ------------------------------------------------------------------


def test_cluster_retrain_keeps_runs_and_snapshot_on_the_shared_mount():
    cfg = _retrain_config(RETRAIN_RUN)
    # The lock lives in output_dir: on /mnt/shared every cluster of the schedule sees it.
    assert Path(cfg.output_dir).is_absolute() and Path(cfg.output_dir).is_relative_to(SHARED)
    assert Path(cfg.retrain.snapshot).is_absolute() and Path(cfg.retrain.snapshot).is_relative_to(SHARED)
    assert Path(cfg.data.root).is_relative_to(SHARED)


def test_cluster_retrain_gate_is_set():
    section = _retrain_config(RETRAIN_RUN).retrain
    assert (section.num_samples, section.top_k, section.min_gain, section.max_class_drop) == (8, 3, 0.005, 0.05)


def _without(cfg: RunConfig, *fields: str) -> dict:
    dump = cfg.model_dump(mode="json")
    for field in fields:
        section, _, key = field.partition(".")
        if key:
            dump[section].pop(key)
        else:
            dump.pop(section)
    return dump


@pytest.mark.parametrize("retrain, base", [(RETRAIN_RUN, CLUSTER_RUN), (RETRAIN_LOCAL, DEMO_RUN)],
                         ids=["cluster", "local"])
def test_retrain_run_file_is_its_search_plus_the_retrain_section(retrain, base):
    # "keep them in step": every section but the name, the data root and `retrain:`.
    assert _without(_retrain_config(retrain), "name", "retrain", "data.root") == \
        _without(_retrain_config(base), "name", "retrain", "data.root")


def test_local_retrain_runs_in_the_repository():
    cfg = _retrain_config(RETRAIN_LOCAL)
    assert cfg.output_dir == "runs" and cfg.retrain.snapshot == "data/digits"
    assert (cfg.retrain.num_samples, cfg.retrain.top_k) == (4, 3)


# --- the systemd units and the crontab line ---------------------------------------------------


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)  # %h is systemd's, not ours
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_timer_starts_the_service_weekly_and_catches_up():
    timer = _unit(TIMER)["Timer"]
    assert timer["OnCalendar"].strip()
    assert timer["Persistent"] == "true"
    assert timer["Unit"] == "retrain.service" == SERVICE.name
    assert _unit(TIMER)["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_timer_calendar_is_mondays_at_three():
    spec = _unit(TIMER)["Timer"]["OnCalendar"]
    out = subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Normalized form: Mon *-*-* 03:00:00" in out.stdout  # as the cluster schedules


def _service_argv() -> list[str]:
    return shlex.split(_unit(SERVICE)["Service"]["ExecStart"])


def test_service_is_a_oneshot_tunecv_retrain_of_a_valid_run_file():
    service = _unit(SERVICE)["Service"]
    assert service["Type"] == "oneshot"
    assert service["WorkingDirectory"]  # the run file's path is relative to the repository
    argv = _service_argv()
    assert argv[0].endswith("/.venv/bin/tunecv")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "retrain" and args.config == "configs/retrain-local.yaml"
    assert _retrain_config(REPO / args.config).retrain is not None


def _crontab_line() -> tuple[str, list[str]]:
    """The crontab line documented in the service's comments: (schedule, command argv)."""
    lines = [line.lstrip("#").strip() for line in SERVICE.read_text().splitlines() if line.startswith("#")]
    (line,) = [line for line in lines if "tunecv retrain" in line and re.match(r"^(\S+\s+){5}cd ", line)]
    fields = line.split(None, 5)
    return " ".join(fields[:5]), shlex.split(fields[5])


def test_crontab_line_is_the_same_retrain_behind_flock():
    schedule, argv = _crontab_line()
    _parse_cron(schedule)
    assert _cron_ticks(schedule, datetime(2025, 1, 1), 14) == _cron_ticks(_schedule("cronjob"), datetime(2025, 1, 1), 14)
    flock = argv.index("flock")
    assert argv[flock + 1] == "-n"  # skip a tick during a retrain, never queue it
    lock_file = argv[flock + 2]
    tunecv = next(i for i, a in enumerate(argv) if a.endswith(".venv/bin/tunecv"))
    assert tunecv == flock + 3
    end = argv.index(">>") if ">>" in argv else len(argv)
    args = build_parser().parse_args(argv[tunecv + 1:end])
    assert args.command == "retrain" and args.config == "configs/retrain-local.yaml"
    # flock must not hold tunecv's own lock file, or tunecv would refuse itself.
    model = _retrain_config(REPO / args.config).retrain.model_name
    assert Path(lock_file).name != f".retrain-{model}.lock"
