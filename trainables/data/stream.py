"""A pack (``trainables/data/packs.py``) streamed into the training loop by Ray Data: each
rank reads its own Parquet files (``read_parquet``), Ray Data's tasks decode and
augment them (``map_batches``), and ``iter_torch_batches`` hands the loop (x, y) batches.

A ``PackStream`` has a DataLoader's shape (``len``, iteration, and ``set_epoch`` as its
sampler has), so the loop drives both loaders with the same code. It does not use Ray
Train's ``get_dataset_shard``: that ``streaming_split``s one dataset, so rows go to
whichever rank asks first and some are dropped to keep the ranks equal, and neither
the training order nor the validation set would be reproducible. Instead:

- training: a seeded permutation of the files per epoch, rank r takes every world-th
  file, and every rank stops after the same number of batches (DDP needs equal steps);
  rows are shuffled in a local buffer with a seed of (seed, epoch, rank);
- augmentation: seeded per row from (seed, epoch, row), whichever task decodes it;
- validation: rank r reads every world-th file, whole, so the ranks together see every
  validation image once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import islice

import numpy as np

from trainables.config import AugmentConfig, TrialConfig
from trainables.errors import TrialConfigError
from trainables.data.packs import Pack, PackFile, read_pack
from trainables.runtime.ranks import Runtime

DECODE_BATCH = 64  # images per map_batches call: fixed, so blocks (and the shuffle) never depend on the cluster
SHUFFLE_BATCHES = 4  # the local shuffle buffer, in batches


@dataclass(frozen=True)
class DecodeSpec:
    """What a Ray Data task needs to turn packed bytes into normalised CHW float32 images."""

    image_size: int
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    max_pixels: int
    augment: AugmentConfig | None  # None: the deterministic validation transform
    seed: int = 0


@functools.lru_cache(maxsize=4)
def _transform(spec: DecodeSpec):
    from trainables.data.transforms import create_eval_transform, create_train_transform

    if spec.augment is None:
        return create_eval_transform(spec.image_size, spec.resize_mode, spec.mean, spec.std, spec.crop_pct)
    return create_train_transform(spec.image_size, spec.augment, spec.mean, spec.std)


def _row_seed(seed: int, epoch: int, row: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])


def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec, epoch: int) -> dict[str, np.ndarray]:
    """Ray Data task: decode (and for training, augment) a batch of packed rows."""
    import torch

    from trainables.data.images import decode_rgb

    transform = _transform(spec)
    images = []
    for data, row in zip(batch["image"], batch["row"]):
        rgb = decode_rgb(bytes(data), max_pixels=spec.max_pixels, name=f"pack row {row}")
        if spec.augment is not None:
            # The same row in the same epoch gets the same crop, flip and jitter, whichever
            # task of whichever node decodes it: results do not depend on scheduling.
            transform.set_random_seed(_row_seed(spec.seed, epoch, int(row)))
        images.append(transform(image=rgb)["image"])
    return {"image": torch.stack(images).numpy(), "label": batch["label"]}


class PackStream:
    """One rank's batches from a pack's training or validation files.

    Args:
        pack: The pack.
        files: The split's files, in ``pack.json``'s order.
        spec: How rows are decoded.
        batch_size: Images per batch.
        runtime: This rank's place in the job.
        num_batches: Training: batches per epoch, the same on every rank (the last,
            partial batch is dropped). None for validation: every row of this rank's files.
    """

    def __init__(self, pack: Pack, files: tuple[PackFile, ...], spec: DecodeSpec, batch_size: int,
                 runtime: Runtime, num_batches: int | None = None) -> None:
        self.pack, self.files, self.spec = pack, files, spec
        self.batch_size, self.runtime, self.num_batches = batch_size, runtime, num_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        return sum(-(-f.rows // self.batch_size) for f in self._my_files())

    def _my_files(self) -> list[PackFile]:
        files = list(self.files)
        if self.num_batches is not None:  # training: a new file order every epoch
            order = np.random.default_rng([self.spec.seed, self.epoch]).permutation(len(files))
            files = [files[i] for i in order]
        return files[self.runtime.rank::self.runtime.world_size]

    def __iter__(self):
        import ray.data

        files = self._my_files()
        if not files:  # more ranks than validation files: this rank evaluates nothing
            return
        fs, base = self.pack.filesystem()
        training = self.num_batches is not None
        ds = ray.data.read_parquet(
            [f"{base.rstrip('/')}/{f.path}" for f in files], filesystem=fs, partitioning=None,
            override_num_blocks=len(files),
        ).select_columns(["row", "label", "image"]).map_batches(
            decode_batch, batch_size=DECODE_BATCH, fn_kwargs={"spec": self.spec, "epoch": self.epoch})
        ds.context.execution_options.preserve_order = True  # the same blocks, in order, every run
        quiet(ds)
        seed = np.random.SeedSequence([self.spec.seed, self.epoch, self.runtime.rank]).generate_state(1)[0]
        batches = ds.iter_torch_batches(
            batch_size=self.batch_size, drop_last=training, device="cpu",
            local_shuffle_buffer_size=SHUFFLE_BATCHES * self.batch_size if training else None,
            local_shuffle_seed=int(seed) if training else None,
        )
        for batch in islice(batches, self.num_batches):
            yield batch["image"], batch["label"]


def quiet(ds):
    """``ds`` without progress bars, and Ray Data's INFO lines (plans, progress) out of the
    console; Ray Data's own log (the session's ``logs/ray-data``) keeps them."""
    import logging

    ds.context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    return ds


def train_batches_per_rank(files: tuple[PackFile, ...], batch_size: int, world_size: int) -> int:
    """Batches every rank can fill in any epoch: the rank with the fewest files gets
    ``len(files) // world_size`` of them, at worst the smallest ones.
    e.g. 1,437 digits in files of 256: 1 rank 1,437 // 64 = 22; 2 ranks 3 files, at worst
    256 + 256 + 157 = 669 -> 10 batches each.

    Raises:
        TrialConfigError: Fewer files than ranks, or fewer rows than one batch per rank.
    """
    per_rank = len(files) // world_size
    if per_rank == 0:
        raise TrialConfigError(f"the pack has {len(files)} training file(s) for {world_size} workers; each worker "
                               "streams whole files. Pack again with a smaller --rows-per-file.")
    rows = sum(sorted(f.rows for f in files)[:per_rank])
    if rows < batch_size:
        raise TrialConfigError(f"optim.batch_size {batch_size} is larger than the {rows} training images each of "
                               f"{world_size} worker(s) is sure to get from the pack; lower batch_size to at most "
                               f"{rows}.")
    return rows // batch_size


def create_streams(cfg: TrialConfig, fingerprint: str, runtime: Runtime, pre: dict
                   ) -> tuple[PackStream, PackStream]:
    """(training, validation) streams of the pack at ``cfg.data.root`` for this rank.

    Args:
        fingerprint: The run's split; the pack must still hold it.
        pre: The backbone's preprocessing (timm's mean, std, crop_pct).

    Raises:
        TrialConfigError: The pack holds another split, or cannot feed this many ranks.
    """
    if cfg.optim.balanced_sampler:
        raise TrialConfigError("optim.balanced_sampler needs data.loader: dataloader; a pack is streamed in "
                               "file order. Set balanced_sampler: false or use the dataloader.")
    pack = read_pack(cfg.data.root)
    if pack.fingerprint != fingerprint:
        raise TrialConfigError(f"the pack at data.root {cfg.data.root!r} holds split {pack.fingerprint[:12]}, the "
                               f"run's split is {fingerprint[:12]}; the pack changed since the run began.")
    data, batch_size = cfg.data, cfg.optim.batch_size
    common = dict(image_size=data.image_size, resize_mode=data.resize_mode, mean=tuple(pre["mean"]),
                  std=tuple(pre["std"]), crop_pct=pre["crop_pct"], max_pixels=data.max_image_pixels)
    train_spec = DecodeSpec(**common, augment=cfg.augment, seed=cfg.optim.seed)
    num_batches = train_batches_per_rank(pack.train, batch_size, runtime.world_size)
    return (PackStream(pack, pack.train, train_spec, batch_size, runtime, num_batches),
            PackStream(pack, pack.val, DecodeSpec(**common, augment=None), 2 * batch_size, runtime))
