"""Loader processes and torch threads from the CPUs a rank holds, and the decoded-image
cache of a dataset read by the training process itself."""

import numpy as np
import pytest
from PIL import Image

from trainables.data.datasets import ImageDataset, Sample
from trainables.data.loaders import loader_plan


@pytest.mark.parametrize("num_workers, cpus, on_gpu, expected", [
    ("auto", 1, False, (0, 1)),  # a 1-CPU trial decodes in-process
    ("auto", 2, False, (0, 2)),  # 2 cores: a loader process cost the loop 12 % (bench/throughput.py)
    ("auto", 8, False, (2, 6)),
    ("auto", 4, True, (3, 1)),  # a GPU rank: all but one CPU feed it
    ("auto", 32, True, (8, 24)),
    ("auto", 0.5, False, (0, 1)),  # a fractional CPU still gets a thread
    (3, 4, True, (3, 1)),  # an explicit count is kept; torch gets the rest
    (4, 2, False, (4, 1)),
])
def test_loader_plan(num_workers, cpus, on_gpu, expected):
    assert loader_plan(num_workers, cpus, on_gpu) == expected


def test_num_workers_is_a_count_or_auto():
    from pydantic import ValidationError

    from trainables.config import DataConfig

    assert DataConfig(root="x").num_workers == "auto"
    assert DataConfig(root="x", num_workers=3).num_workers == 3
    with pytest.raises(ValidationError, match="auto"):
        DataConfig(root="x", num_workers="many")


def _images(tmp_path, n=4):
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    return [Sample(f"{i}.png", i % 2, "0" * 40) for i in range(n)]


def test_decoded_images_are_cached_up_to_the_budget(tmp_path):
    samples = _images(tmp_path)
    cached = ImageDataset(str(tmp_path), samples, None, cache_bytes=3 * 8 * 8 * 3)  # room for 3 of 4
    first = [cached[i][0].copy() for i in range(4)]
    for i in range(4):
        (tmp_path / f"{i}.png").unlink()  # a second epoch must not need the files
    assert all(np.array_equal(cached[i][0], first[i]) for i in range(3))
    with pytest.raises(OSError):
        cached[3]  # over the budget: not cached, read again
    uncached = ImageDataset(str(tmp_path), samples, None)
    with pytest.raises(OSError):
        uncached[0]


def test_a_transform_cannot_change_a_cached_image(tmp_path):
    samples = _images(tmp_path, 1)

    def in_place(image):
        image += 1  # what a careless transform might do
        return {"image": image}

    dataset = ImageDataset(str(tmp_path), samples, in_place, cache_bytes=10_000)
    with pytest.raises(ValueError, match="read-only"):
        dataset[0]
