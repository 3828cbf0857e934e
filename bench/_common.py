"""Shared set-up for the benchmarks: the bundled digits, a base run config, and result
files that say which commit they measured."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MEASURED_PATHS = ("search", "trainables", "spaces", "configs", "bench/*.py", "pyproject.toml")


def digits_root(image_size: int) -> Path:
    """The bundled digits at ``image_size`` px, written once under data/."""
    from trainables.data.demo_data import write_digits

    root = REPO / "data" / f"digits_{image_size}"
    if not root.is_dir():
        write_digits(root, image_size=image_size)
    return root


def smoke_root() -> Path:
    """What smoke runs train on: 4 synthetic classes of 40 images at 16 px (an epoch
    takes a fraction of a second), written once under data/."""
    from trainables.data.demo_data import write_synthetic

    root = REPO / "data" / "smoke_synthetic_16"
    if not root.is_dir():
        write_synthetic(root, num_classes=4, images_per_class=40, image_size=16)
    return root


def load_demo_config(overrides: list[str]):
    from search.config import load_config

    # No finalists unless a benchmark asks (bench/selection.py): the others measure the
    # search itself, and count its trials.
    return load_config(REPO / "configs" / "demo.yaml", ["search.finalists.k=0", *overrides])


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A local Ray of ``num_cpus`` CPUs for the benchmark, or the one this process already
    started (the smoke tests share one between benchmarks: a Ray start is most of a smoke run)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


class BenchError(RuntimeError):
    """A benchmark could not measure what it claims; it writes no result file."""


def commit() -> str:
    """The commit measured, with ``-dirty`` when the code that runs (``MEASURED_PATHS``)
    differs from it; tests, docs and earlier results do not change what is measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return f"{sha}-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_PATHS) else sha


def write_result(name: str, payload: dict, results: Path = RESULTS) -> Path:
    """Write ``results/<name>.json``, stamped with the commit and the time measured."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    stamp = {"commit": commit(), "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps({**stamp, **payload}, indent=2))
    return path
