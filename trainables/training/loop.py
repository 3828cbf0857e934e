"""The fine-tuning loop: one function that trains and evaluates a trial, epoch by epoch.

``run_trial`` is the same code in-process (``tunecv train``, in-process search trials)
and inside every Ray Train worker; the ``Runtime`` says which, and the ``Reporter``
decides what an epoch's result and checkpoint become. This module owns the step
(autocast, GradScaler, gradient accumulation with DDP ``no_sync``) and the evaluation
gathered over every rank. Building the pieces lives in the modules it imports.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.model.backbones import (
    count_params,
    create_backbone,
    data_config,
    param_groups,
    set_train_mode,
    unwrap,
)
from trainables.model.checkpoint import (
    load_training_state,
    load_weights_into,
    save_checkpoint,
    save_training_state,
    write_epoch_metrics,
)
from trainables.config import TrialConfig
from trainables.data.datasets import DataSplit
from trainables.data.loaders import create_train_loader, create_val_loader, loader_plan
from trainables.training.losses import create_loss
from trainables.training.metrics import TOP_K, EvalMetrics, compute_metrics, top_k_classes
from trainables.training.optim import create_optimizer, create_scheduler
from trainables.training.reporting import EpochResult, Reporter
from trainables.runtime.ranks import Runtime
from trainables.data.transforms import create_eval_transform, create_train_transform, preprocessing_spec


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32) and whether fp16 loss scaling is needed."""

    dtype: torch.dtype | None
    grad_scaling: bool


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Map the config's precision to what this device can do.

    ``auto`` is bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, and fp32
    on CPU (CPU bf16 is only fast with AMX/AVX512-BF16; ask for it explicitly).
    """
    if name == "auto":
        if device.type != "cuda":
            return Precision(None, False)
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp32":
        return Precision(None, False)
    if name == "bf16":
        return Precision(torch.bfloat16, False)
    if device.type != "cuda":
        raise ValueError("optim.precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU.")
    return Precision(torch.float16, True)


@dataclass(frozen=True)
class TrialSummary:
    """What a finished trial leaves behind (besides what its reporter kept)."""

    epochs_run: int
    best: EpochResult | None
    num_params: int
    trainable_params: int


@dataclass
class _Parts:
    model: nn.Module
    # A DataLoader, or a trainables.data.stream.PackStream of the same shape (len, iteration, set_epoch).
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    precision: Precision
    meta: dict


def _build(cfg: TrialConfig, split: DataSplit, runtime: Runtime, resume_from: Path | None) -> _Parts:
    torch.manual_seed(cfg.optim.seed)  # same init on every rank; DDP also broadcasts it
    model = create_backbone(cfg.model, num_classes=len(split.class_names))
    if resume_from is not None:
        load_weights_into(model, resume_from)  # before DDP wraps it and the optimizer sees it
    head = param_groups(model).head
    pre = data_config(model)
    size, data = cfg.data.image_size, cfg.data
    if data.loader == "ray_data":
        from trainables.data.stream import create_streams  # imports Ray Data: only when asked for

        # Ray Data's tasks decode on CPUs of their own (the trial's data bundle).
        torch.set_num_threads(max(1, int(runtime.cpus)))
        train_loader, val_loader = create_streams(cfg, split.fingerprint(), runtime, pre)
    else:
        workers, threads = loader_plan(data.num_workers, runtime.cpus, runtime.device.type == "cuda")
        torch.set_num_threads(threads)  # the CPUs the loader processes leave to training
        common = dict(num_workers=workers, runtime=runtime, max_pixels=data.max_image_pixels)
        train_tf = create_train_transform(size, cfg.augment, pre["mean"], pre["std"],
                                          seed=cfg.optim.seed + runtime.rank)
        val_tf = create_eval_transform(size, data.resize_mode, pre["mean"], pre["std"], pre["crop_pct"])
        train_loader = create_train_loader(
            split, train_tf, batch_size=cfg.optim.batch_size, balanced=cfg.optim.balanced_sampler,
            seed=cfg.optim.seed, **common,
        )
        val_loader, _ = create_val_loader(split, val_tf, batch_size=2 * cfg.optim.batch_size, **common)
    optimizer = create_optimizer(model, head, cfg.optim)  # before DDP: names still match
    # e.g. 1,437 train images / 64 = 22 batches, accumulation 2 -> 11 optimizer steps
    steps_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum_steps)
    total, trainable = count_params(model)
    meta = {
        "class_names": list(split.class_names),
        "backbone": cfg.model.backbone,
        "preprocessing": preprocessing_spec(size, data.resize_mode, pre["mean"], pre["std"], pre["crop_pct"]),
        "config": cfg.model_dump(mode="json"),
        "data_fingerprint": split.fingerprint(),
        "num_params": total,
        "trainable_params": trainable,
    }
    if runtime.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return _Parts(
        model=runtime.prepare_model(model),
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg.optim, steps_per_epoch),
        loss_fn=create_loss(cfg.loss, split.class_counts("train")).to(runtime.device),
        precision=resolve_precision(cfg.optim.precision, runtime.device),
        meta=meta,
    )


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(parts: _Parts, runtime: Runtime, accum_steps: int, scaler) -> tuple[float, int]:
    """One pass over this rank's training shard.

    Returns:
        (mean training loss, images seen by this rank).

    Raises:
        FloatingPointError: The loss became NaN or infinite.
    """
    model, optimizer, p = parts.model, parts.optimizer, parts.precision
    set_train_mode(model)
    n_batches = len(parts.train_loader)
    loss_sum = torch.zeros((), device=runtime.device)  # summed on device: no per-step sync
    seen = 0
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(parts.train_loader):
        x, y = _to_device(x, y, runtime.device)
        steps_now = (i + 1) % accum_steps == 0 or i + 1 == n_batches
        # Skip DDP's gradient all-reduce on micro-batches that do not step.
        sync = contextlib.nullcontext() if steps_now or runtime.world_size == 1 else model.no_sync()
        with sync:
            with torch.autocast(runtime.device.type, dtype=p.dtype, enabled=p.dtype is not None):
                loss = parts.loss_fn(model(x), y)
            scaler.scale(loss / accum_steps).backward()
        if steps_now:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            parts.scheduler.step()
        loss_sum += loss.detach().float() * x.shape[0]
        seen += x.shape[0]
    mean_loss = float(loss_sum) / max(1, seen)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss is {mean_loss}: lower optim.lr_head/lr_base or use fp32/bf16."
        )
    return mean_loss, seen


@contextlib.contextmanager
def _exact_fp32():
    """fp32 without TF32 on CUDA: the numbers an fp32 ONNX export will reproduce."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    runtime: Runtime,
    class_names: list[str],
) -> EvalMetrics:
    """Metrics over the whole validation set: each rank runs its shard, all gather.

    Shards are contiguous and in rank order, so concatenating the gathered pieces
    restores the validation order, and the numbers equal a single-process run.
    Evaluation is always plain fp32, whatever the training precision: the reported
    macro-F1 must be the one the exported (fp32) model reproduces, and it decides
    the ranking, where bf16 rounding could swap near-tied trials.
    """
    net = unwrap(model)  # plain forward: DDP would try to sync buffers across ranks
    net.eval()
    k = min(TOP_K, len(class_names))
    labels, topk, losses = [], [], []
    for x, y in loader:
        x, y = _to_device(x, y, runtime.device)
        with _exact_fp32():
            logits = net(x).float()
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu().numpy())
        topk.append(top_k_classes(logits.cpu().numpy(), k))
        labels.append(y.cpu().numpy())
    empty = (np.zeros(0, np.int64), np.zeros((0, k), np.int64), np.zeros(0, np.float32))
    local = (np.concatenate(labels), np.concatenate(topk), np.concatenate(losses)) if labels else empty
    pieces = runtime.all_gather(local)
    return compute_metrics(
        np.concatenate([p[0] for p in pieces]),
        np.concatenate([p[1] for p in pieces]),
        np.concatenate([p[2] for p in pieces]),
        class_names,
    )


def _set_epoch(loader, epoch: int) -> None:
    """Reshuffle for ``epoch``: a DataLoader through its sampler, a PackStream itself."""
    (loader.sampler if isinstance(loader, torch.utils.data.DataLoader) else loader).set_epoch(epoch)


def _lr_of(optimizer: torch.optim.Optimizer, role: str) -> float | None:
    return next((g["lr"] for g in optimizer.param_groups if g["role"] == role), None)


def run_trial(
    cfg: TrialConfig,
    split: DataSplit,
    reporter: Reporter,
    runtime: Runtime,
    resume_from: Path | None = None,
) -> TrialSummary:
    """Fine-tune ``cfg`` on ``split`` for ``cfg.optim.epochs`` epochs, reporting each one.

    Args:
        cfg: The fully resolved trial config.
        split: The run's fixed train/validation split.
        reporter: Receives every epoch's result and (on the chief) a checkpoint.
        runtime: In-process or Ray Train worker.
        resume_from: A checkpoint with ``train_state/`` (any epoch the loop saved): weights,
            optimizer, LR schedule and GradScaler are restored and training continues
            with the epoch after it.

    Returns:
        A summary with the best epoch by macro-F1 (among the epochs run in this call).
    """
    parts = _build(cfg, split, runtime, resume_from)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=parts.precision.grad_scaling)
    done = 0
    if resume_from is not None:
        done = load_training_state(resume_from, parts.optimizer, parts.scheduler, scaler)
    best: EpochResult | None = None
    class_names = list(split.class_names)
    for epoch in range(done + 1, cfg.optim.epochs + 1):
        _set_epoch(parts.train_loader, epoch)
        lr_head, lr_base = _lr_of(parts.optimizer, "head"), _lr_of(parts.optimizer, "base")
        start = time.perf_counter()
        train_loss, seen = train_one_epoch(parts, runtime, cfg.optim.grad_accum_steps, scaler)
        train_time = time.perf_counter() - start
        runtime.average_buffers(unwrap(parts.model))
        metrics = evaluate(parts.model, parts.val_loader, runtime, class_names)
        result = EpochResult(
            epoch=epoch,
            train_loss=train_loss,
            train_images_per_s=seen * runtime.world_size / train_time,
            epoch_time_s=time.perf_counter() - start,
            lr_head=lr_head,
            lr_base=lr_base,
            metrics=metrics,
            num_params=parts.meta["num_params"],
            trainable_params=parts.meta["trainable_params"],
        )
        if best is None or metrics.macro_f1 > best.metrics.macro_f1:
            best = result
        _report(parts, result, reporter, runtime, scaler)
    return TrialSummary(
        epochs_run=cfg.optim.epochs,
        best=best,
        num_params=parts.meta["num_params"],
        trainable_params=parts.meta["trainable_params"],
    )


def _report(parts: _Parts, result: EpochResult, reporter: Reporter, runtime: Runtime, scaler) -> None:
    if not runtime.is_chief:
        reporter.report(result, None)
        return
    with tempfile.TemporaryDirectory(prefix="tunecv-ckpt-") as tmp:
        meta = {**parts.meta, "epoch": result.epoch, "metrics": result.metrics.scalars()}
        save_checkpoint(Path(tmp), unwrap(parts.model), meta)
        write_epoch_metrics(Path(tmp), {**result.scalars(), **result.details()})
        # Every epoch's checkpoint can resume the trial: a retry continues from it.
        save_training_state(Path(tmp), parts.optimizer, parts.scheduler, scaler, result.epoch)
        reporter.report(result, Path(tmp))
