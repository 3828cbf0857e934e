"""Faults injected into the trials of a real Ray, for tests only: Ray runs ``install``
in every worker process (``runtime_env={"worker_process_setup_hook":
"tests.fault_hooks.install"}``), and it wraps ``trainables.runtime.workers.run_trial_from``, the
entry of both trial paths, when ``TUNECV_TEST_FAULTS`` asks for a fault.

``TUNECV_TEST_FAULTS`` is JSON: ``{"<fault>": {"<section>.<field>": value, ...}}``; a
fault strikes every trial whose resolved config has all those values ({} matches all):
- ``config_error``: raise ``TrialConfigError``, as a config only the trial finds bad;
- ``crash``: raise ``RuntimeError``, as an unexpected error would (Tune retries it);
- ``hang``: block forever before the first epoch, as a stuck step would.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

FAULTS_ENV = "TUNECV_TEST_FAULTS"
_REPO = str(Path(__file__).resolve().parents[1])


def runtime_env(**faults: dict) -> dict:
    """The ``runtime_env`` that installs ``faults`` in every worker of a job (the
    repository on PYTHONPATH: Ray runs the hook before it adds the driver's paths)."""
    path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)
    return {"worker_process_setup_hook": "tests.fault_hooks.install",
            "env_vars": {FAULTS_ENV: json.dumps(faults), "PYTHONPATH": path}}


def job_config_env(**faults: dict) -> dict:
    """Environment for a driver process whose own ``ray.init`` should take ``faults``: Ray
    reads a job's runtime_env from this variable, as under ``ray job submit``."""
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": runtime_env(**faults)})}


def _matches(cfg, condition: dict) -> bool:
    dumped = cfg.model_dump(mode="json")
    for path, value in condition.items():
        section, field = path.split(".")
        if dumped[section][field] != value:
            return False
    return True


def install() -> None:
    faults = json.loads(os.environ.get(FAULTS_ENV) or "{}")
    if not faults:
        return
    import trainables.runtime.workers as workers
    from trainables.errors import TrialConfigError

    original = workers.run_trial_from

    def run_trial_from(cfg, *args, **kwargs):
        if "config_error" in faults and _matches(cfg, faults["config_error"]):
            raise TrialConfigError(f"test fault: {faults['config_error']} cannot train")
        if "crash" in faults and _matches(cfg, faults["crash"]):
            raise RuntimeError("test fault: an unexpected crash")
        if "hang" in faults and _matches(cfg, faults["hang"]):
            threading.Event().wait()  # blocks forever, like a stuck collective
        return original(cfg, *args, **kwargs)

    workers.run_trial_from = run_trial_from
