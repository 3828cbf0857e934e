"""DataLoaders and samplers for one rank: sharded training data, sharded validation.

Owns batching decisions: per-rank sampling (shuffled or class-balanced, disjoint across
ranks), ``drop_last`` on training (a last batch of 1 breaks BatchNorm), persistent
workers, pinned memory on GPU, and the contiguous, unpadded validation shards whose
results the loop gathers so metrics cover every validation image exactly once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from trainables.data.datasets import DataSplit, ImageDataset
from trainables.errors import TrialConfigError
from trainables.data.locations import is_uri
from trainables.runtime.ranks import Runtime


class WeightedShardSampler(Sampler[int]):
    """Class-balanced sampling with replacement, drawn independently per rank.

    Each rank draws ``len(dataset) // world_size`` indices per epoch with weights
    ``1 / count(class)``, so every class is expected equally often across the job.
    """

    def __init__(self, labels: Sequence[int], runtime: Runtime, seed: int) -> None:
        counts = np.bincount(np.asarray(labels))
        weights = 1.0 / counts[np.asarray(labels)]
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = len(labels) // runtime.world_size
        self.rank = runtime.rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + 10_007 * self.epoch + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, True, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


DECODED_CACHE_BYTES = 256 * 2**20  # per dataset, when the training process decodes (digits at 64 px: 18 MB)
GPU_MAX_LOADER_WORKERS = 8  # past this, one rank's decode rarely gains: the GPU waits on other things


def loader_plan(num_workers: int | str, cpus: float, on_gpu: bool) -> tuple[int, int]:
    """(DataLoader processes, torch threads) for one rank holding ``cpus`` CPUs.

    On the CPU, torch's threads do the training and loader processes take cores from
    them: on 2 cores one loader process cost the loop 12 % against raw steps (0.878 of
    raw; bench/throughput.py), so up to 2 CPUs decode in the training process (with
    decoded images cached) and beyond that a quarter of the CPUs load. On a GPU the
    rank's CPUs are for feeding it: all but one load. An explicit ``num_workers`` is
    kept; torch then gets the CPUs left over.
    """
    whole = max(1, int(cpus))
    if num_workers == "auto":
        if on_gpu:
            workers = min(GPU_MAX_LOADER_WORKERS, max(1, whole - 1))
        else:
            workers = 0 if whole <= 2 else max(1, whole // 4)
    else:
        workers = int(num_workers)
    return workers, max(1, whole - workers)


def _worker_init(worker_id: int) -> None:
    import cv2

    # Each loader process decodes one image at a time; OpenCV's own thread pool would
    # only fight the training threads for the same cores.
    cv2.setNumThreads(0)
    # torch gives each worker base_seed + worker_id, base_seed drawn from the loader's
    # seeded generator: reproducible, and distinct per worker. Albumentations keeps its
    # own RNG inside Compose, which every forked worker would otherwise share.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = torch.utils.data.get_worker_info().dataset
    if isinstance(dataset, ImageDataset):
        dataset.reseed(seed)


def _loader(dataset, *, batch_size: int, sampler, drop_last: bool, num_workers: int, pin: bool, seed: int = 0,
            remote: bool = False):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        # Images in an object store: the AWS SDK's threads do not survive a fork, and the
        # trial process has already used it (its checkpoints, often its data): loader
        # processes start fresh from a fork server instead, and open the bucket themselves.
        multiprocessing_context="forkserver" if remote and num_workers > 0 else None,
    )


def create_train_loader(
    split: DataSplit,
    transform,
    *,
    batch_size: int,
    num_workers: int,
    balanced: bool,
    seed: int,
    runtime: Runtime,
    max_pixels: int,
) -> DataLoader:
    """The training loader for this rank.

    Raises:
        TrialConfigError: Fewer training images per rank than one batch.
    """
    per_rank = len(split.train) // runtime.world_size
    if per_rank < batch_size:
        raise TrialConfigError(
            f"optim.batch_size {batch_size} is larger than the {per_rank} training images "
            f"each of {runtime.world_size} worker(s) gets; lower batch_size to at most {per_rank}."
        )
    dataset = ImageDataset(split.root, split.train, transform, max_pixels=max_pixels,
                           cache_bytes=DECODED_CACHE_BYTES if num_workers == 0 else 0)
    if balanced:
        sampler = WeightedShardSampler([s.label for s in split.train], runtime, seed)
    else:
        sampler = DistributedSampler(
            dataset,
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
    return _loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin=runtime.device.type == "cuda",
        seed=seed + runtime.rank,
        remote=is_uri(split.root),
    )


def val_shard(num_items: int, runtime: Runtime) -> range:
    """This rank's contiguous slice of the validation set; slices cover it exactly once."""
    per_rank = math.ceil(num_items / runtime.world_size)
    start = min(num_items, runtime.rank * per_rank)
    return range(start, min(num_items, start + per_rank))


def create_val_loader(
    split: DataSplit,
    transform,
    *,
    batch_size: int,
    num_workers: int,
    runtime: Runtime,
    max_pixels: int,
    which: str = "val",
) -> tuple[DataLoader, range]:
    """The evaluation loader over this rank's shard of ``which`` ("val", or "test" after the
    search), and the shard's global indices."""
    dataset = ImageDataset(split.root, split.samples(which), transform, max_pixels=max_pixels,
                           cache_bytes=DECODED_CACHE_BYTES if num_workers == 0 else 0)
    shard = val_shard(len(dataset), runtime)
    loader = _loader(
        Subset(dataset, list(shard)),
        batch_size=batch_size,
        sampler=None,
        drop_last=False,
        num_workers=num_workers,
        pin=runtime.device.type == "cuda",
        remote=is_uri(split.root),
    )
    return loader, shard
