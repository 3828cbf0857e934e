"""Shared set-up for the search benchmarks: the bundled digits and a base run config."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def digits_root(image_size: int) -> Path:
    """The bundled digits at ``image_size`` px, written once under data/."""
    from trainables.demo_data import write_digits

    root = REPO / "data" / f"digits_{image_size}"
    if not root.is_dir():
        write_digits(root, image_size=image_size)
    return root


def load_demo_config(overrides: list[str]):
    from search.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", overrides)


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
