"""Where each trial of a benchmark ran, as Ray assigned it: a ``worker_process_setup_hook``
(``runtime_env``) that wraps ``trainables.runtime.workers.run_trial_from``, the entry of every
trial, and appends one JSON line per trial attempt to the file ``PROBE_ENV`` names: the
Tune trial id, the Ray node id, the GPU ids Ray gave the process, its pid and the time.

It adds nothing to the trial's work but the line, and changes no result. It lives in
bench/ because only benchmarks use it; the product records no placement of its own.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

PROBE_ENV = "TUNECV_BENCH_PROBE"
_REPO = str(Path(__file__).resolve().parents[1])


def runtime_env(probe_file: Path) -> dict:
    """The job ``runtime_env`` that installs the probe in every worker (the repository
    on PYTHONPATH: Ray runs the hook before it adds the driver's paths)."""
    path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)
    return {"worker_process_setup_hook": "bench._trial_probe.install",
            "env_vars": {PROBE_ENV: str(probe_file), "PYTHONPATH": path}}


def install() -> None:
    if os.environ.get(PROBE_ENV):
        sys.meta_path.insert(0, _WrapOnImport())


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``run_trial_from`` once a trial imports ``trainables.runtime.workers``. Importing it
    in the hook itself loaded torch (~0.7 GB, 2.6 s here) into every worker Ray starts,
    trial or not (the storage probe's task on each node): the smoke run took 39-42 s
    with that, 33 s without."""

    def find_spec(self, name, path, target=None):
        if name != "trainables.runtime.workers":
            return None
        sys.meta_path.remove(self)  # the real finders find it; this one only wraps
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            module.run_trial_from = _probed(module.run_trial_from)

        spec.loader.exec_module = exec_module
        return spec


def _probed(run_trial_from):
    path = os.environ[PROBE_ENV]

    def probed(*args, **kwargs):
        import ray
        from ray import tune

        context = ray.get_runtime_context()
        line = {"trial": tune.get_context().get_trial_id(), "node": context.get_node_id(),
                "gpus": context.get_accelerator_ids().get("GPU", []), "pid": os.getpid(), "time": time.time()}
        # Written at the trial's start: an ASHA stop may end the trial's thread anywhere.
        # One short line per append: O_APPEND writes of it do not interleave.
        with open(path, "a") as file:
            file.write(json.dumps(line) + "\n")
        return run_trial_from(*args, **kwargs)

    return probed


def read_probe(probe_file: Path) -> dict[str, dict]:
    """Tune trial id -> its last attempt's line (a retried trial writes one per attempt)."""
    if not probe_file.is_file():
        return {}
    lines = [json.loads(line) for line in probe_file.read_text().splitlines() if line.strip()]
    return {line["trial"]: line for line in sorted(lines, key=lambda line: line["time"])}
