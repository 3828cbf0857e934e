"""The finalists' ensemble: the winning configuration's runs (the same hyperparameters,
other seeds: ``search/run/finalists.py``) with their logits averaged in one model, which
``search/export/onnx.py`` exports, verifies and quantizes like a single checkpoint.

Why: the finalists already trained these runs; which of them had the best validation
epoch is mostly luck (a seed's noise on a small split), while their average is better
than a typical run of them. In ``bench/results/selection.json`` the winning
configuration's seed ensemble scored above every single trial of the run on 5,391
independent test images. The cost is serving: one forward pass per member.

The rule (``search.finalists.ensemble``): the ensemble is shipped when its validation
macro-F1 beats the mean of its runs' - the score the selection protocol gives the
winning configuration. Its best run's score is that mean plus the luck that picked it,
so it is not the bar. Otherwise the best run is exported as before, and the ensemble's
numbers go into ``metrics.json`` beside it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from search.layout import join
from search.results.selection import finalist_groups
from search.storage import RunStore
from trainables.data.datasets import DataSplit
from trainables.model.checkpoint import META_FILE, WEIGHTS_FILE, load_model
from trainables.training.metrics import RANKING_METRIC


class LogitMean(nn.Module):
    """Its members' logits averaged: one input, one output, as a single model has."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


@dataclass(frozen=True)
class Ensemble:
    """The winning configuration's runs as one model, and the numbers that decide it."""

    members: tuple[str, ...]  # trial ids, the configuration's source trial first
    checkpoints: tuple[str, ...]  # each member's kept best checkpoint, relative to the run
    member_scores: tuple[float, ...]  # each member's validation macro-F1 (its checkpoint's)
    macro_f1: float  # the ensemble's, on the same validation images (PyTorch, fp32)
    model: LogitMean
    meta: dict[str, Any]  # a checkpoint's meta.json for the ensemble: what export_model needs

    @property
    def members_mean(self) -> float:
        return statistics.fmean(self.member_scores)

    @property
    def shipped(self) -> bool:
        return self.macro_f1 > self.members_mean

    def summary(self, test: dict[str, Any] | None) -> dict[str, Any]:
        """``metrics.json``'s "ensemble": the decision and its numbers."""
        return {
            "members": list(self.members), "checkpoints": list(self.checkpoints),
            f"validation_{RANKING_METRIC}": self.macro_f1, f"members_validation_{RANKING_METRIC}": list(self.member_scores),
            f"members_mean_{RANKING_METRIC}": self.members_mean, "shipped": self.shipped,
            "rule": "shipped when its validation macro-F1 beats the mean of its runs'",
            "test": test,
        }


def winning_ensemble(store: RunStore, trials, split: DataSplit, batch_size: int = 64) -> Ensemble | None:
    """The ensemble of the best finalist configuration's runs that kept a checkpoint; None
    without finalists, with fewer than two such runs, or when their preprocessing differs
    (one graph takes one input)."""
    from search.export.scoring import eval_loader, metrics_from_logits

    groups = finalist_groups(trials)
    if not groups:
        return None
    kept = [(m.trial_id, rel) for m in groups[0].members
            for rel in [next((r for r in m.checkpoints_by_rank() if store.exists(join(r, WEIGHTS_FILE))), None)]
            if rel is not None]
    if len(kept) < 2:
        return None
    models, metas = [], []
    for _, rel in kept:
        with store.local_files(rel, (WEIGHTS_FILE, META_FILE)) as checkpoint:
            model, meta = load_model(checkpoint)
        models.append(model.eval())
        metas.append(meta)
    first = metas[0]
    if any(m["preprocessing"] != first["preprocessing"] or m["class_names"] != first["class_names"] for m in metas):
        return None
    ensemble = LogitMean(models).eval()
    labels, logits = [], []
    with torch.inference_mode():
        for x, y in eval_loader(split, first, batch_size):
            logits.append(ensemble(x).numpy())
            labels.append(y.numpy())
    metrics = metrics_from_logits(np.concatenate(logits), np.concatenate(labels), first["class_names"])
    meta = {**first, "backbone": f"{first['backbone']} x{len(models)} (finalists' ensemble)",
            "metrics": metrics.scalars()}
    return Ensemble(tuple(t for t, _ in kept), tuple(r for _, r in kept),
                    tuple(float(m["metrics"][RANKING_METRIC]) for m in metas), metrics.macro_f1, ensemble, meta)
