"""Optimizer with discriminative learning rates, and the warmup + cosine schedule.

Owns how trainable parameters become AdamW parameter groups (head at ``lr_head``,
pretrained base at ``lr_base``; biases and norm weights without weight decay, as timm
does) and the per-step LR multiplier. It does not decide which parameters train:
``backbones.apply_unfreeze_depth`` has already set ``requires_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from trainables.config import OptimConfig


def create_optimizer(
    model: nn.Module, head_names: Iterable[str], cfg: OptimConfig
) -> torch.optim.AdamW:
    """AdamW over trainable parameters only, grouped by role (head/base) and decay.

    Args:
        model: The model (unwrapped, so names match ``head_names``).
        head_names: Parameter names of the classifier head.
        cfg: Optimisation settings.

    Returns:
        AdamW whose groups carry ``role`` ('head' or 'base') for logging.
    """
    head = set(head_names)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen parameters never reach the optimizer
        role = "head" if name in head else "base"
        decay = param.ndim > 1  # biases, norm scales, tokens stay undecayed
        buckets.setdefault((role, decay), []).append(param)
    lrs = {"head": cfg.lr_head, "base": cfg.lr_base}
    groups = [
        {
            "params": params,
            "lr": lrs[role],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "role": role,
        }
        for (role, decay), params in sorted(buckets.items())
    ]
    if not groups:
        raise ValueError("no trainable parameters: check model.unfreeze_depth.")
    return torch.optim.AdamW(groups, fused=False)


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear 0->1 over warmup, cosine 1->floor after.

    Example: 30 steps, 3 warmup -> step 0 gives 1/3, step 2 gives 1.0, the last step
    gives ``min_lr_ratio``.
    """
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - 1))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR from ``cfg.epochs``, ``cfg.warmup_epochs`` and ``cfg.min_lr_ratio``."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, warmup, cfg.min_lr_ratio)
    )
