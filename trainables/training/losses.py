"""Training losses: ``LOSSES`` is the one registry (name -> how to build it and which
``LossConfig`` fields belong to it) that config validation, spaces and the report read.
Validation loss is always plain cross-entropy, so trials stay comparable.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from trainables.config import LossConfig


def balanced_class_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """Weights ``n_samples / (n_classes * count_c)``, scikit-learn's 'balanced' rule.

    Example: counts [90, 10] -> 100 / (2 * 90) = 0.556 and 100 / (2 * 10) = 5.0.

    Raises:
        ValueError: A class has no training sample (its weight would be infinite).
    """
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if (counts <= 0).any():
        empty = [i for i, c in enumerate(class_counts) if c <= 0]
        raise ValueError(f"classes {empty} have no training samples; balanced weights need >= 1 each.")
    return (counts.sum() / (len(counts) * counts)).float()


class FocalLoss(nn.Module):
    """Softmax focal loss, ``-alpha_y * (1 - p_y)^gamma * log p_y`` (Lin et al., 2017).

    With ``gamma=0`` and no alpha it equals cross-entropy. ``alpha`` is an optional
    per-class weight vector; the mean is taken over samples, unweighted, so the loss
    scale does not depend on which classes a batch happens to hold.
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma cannot be negative, but got {gamma=}.")
        self.gamma = gamma
        self.register_buffer("alpha", alpha if alpha is None else alpha.float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def _focal(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    alpha = None
    if cfg.alpha == "balanced":
        alpha = balanced_class_weights(class_counts)
    elif cfg.alpha is not None:
        if len(cfg.alpha) != len(class_counts):
            raise ValueError(
                f"loss.alpha has {len(cfg.alpha)} weights but the data has {len(class_counts)} "
                "classes; give one weight per class or 'balanced'."
            )
        alpha = torch.tensor(cfg.alpha, dtype=torch.float32)
    return FocalLoss(gamma=cfg.gamma, alpha=alpha)


@dataclass(frozen=True)
class LossSpec:
    """One registered loss."""

    build: Callable[[LossConfig, Sequence[int]], nn.Module]  # (config, train counts per class)
    params: tuple[str, ...] = ()  # the LossConfig fields that belong to this loss (searchable)

    def label(self, name: str, cfg: LossConfig) -> str:
        """A short label for tables, e.g. ``focal(gamma=2)``."""
        values = ", ".join(f"{p}={getattr(cfg, p):.3g}" for p in self.params)
        return f"{name}({values})" if values else name


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(lambda cfg, counts: nn.CrossEntropyLoss()),
    "label_smoothing": LossSpec(
        lambda cfg, counts: nn.CrossEntropyLoss(label_smoothing=cfg.smoothing), params=("smoothing",)
    ),
    "weighted_ce": LossSpec(lambda cfg, counts: nn.CrossEntropyLoss(weight=balanced_class_weights(counts))),
    "focal": LossSpec(_focal, params=("gamma",)),
}


def check_loss_name(name: str) -> None:
    """Raise ``ValueError`` naming the registered losses (and the closest) unless ``name`` is one."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown loss '{name}'; expected one of {list(LOSSES)}.{hint}")


def create_loss(cfg: LossConfig, class_counts: Sequence[int]) -> nn.Module:
    """Build the training loss named by ``cfg.type``.

    Args:
        cfg: Loss settings (``cfg.type`` is validated against ``LOSSES`` when parsed).
        class_counts: Training images per class, in class-index order.

    Returns:
        A module mapping (logits [N, C], targets [N]) to a scalar.

    Raises:
        ValueError: Focal ``alpha`` of the wrong length, or an unknown type.
    """
    check_loss_name(cfg.type)
    return LOSSES[cfg.type].build(cfg, class_counts)


def loss_label(cfg: LossConfig) -> str:
    """The loss of ``cfg`` as the report shows it: its name and its own parameters."""
    return LOSSES[cfg.type].label(cfg.type, cfg)
