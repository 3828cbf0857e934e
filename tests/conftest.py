"""Shared fixtures: small real image folders and run configs for end-to-end tests."""

from pathlib import Path

import pytest

from trainables.demo_data import write_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """4 classes x 40 images at 32 px: learnable in two epochs on two cores."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, num_classes=4, images_per_class=40, image_size=32, seed=0)
    return root


def small_run_config(data_root: Path, output_dir: Path, **sections) -> dict:
    """A raw run config for a tiny, fast trial; ``sections`` override whole sections."""
    raw = {
        "name": "t",
        "output_dir": str(output_dir),
        "data": {"root": str(data_root), "image_size": 32, "num_workers": 0},
        "model": {"backbone": "test_resnet", "pretrained": False},
        "optim": {
            "epochs": 2, "batch_size": 16, "lr_head": 3e-3, "lr_base": 3e-3, "warmup_epochs": 0.2,
        },
        "augment": {"strength": 0.3, "coarse_dropout_p": 0.0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw
