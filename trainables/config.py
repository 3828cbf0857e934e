"""Typed, frozen settings for one trial: data, model, optimisation, loss, augmentation.

This module owns the *shape* of a trial's configuration and every check that can be
made without touching data or weights (types, ranges, unknown keys, unknown backbones
and losses). It does not read YAML or know about searches: ``search/config.py`` parses
the run file and builds these objects, and the search overrides fields of them per
trial. Every model is ``extra="forbid"`` so a misspelt key is an error, not a silently
ignored default.
"""

from __future__ import annotations

import difflib
import functools
import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _as_location(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A local path or an object-store URI (s3://bucket/prefix, gs://...; what pyarrow.fs opens).
Location = Annotated[str, BeforeValidator(_as_location), Field(min_length=1)]


class DataConfig(_Frozen):
    """Where the images are and how they are split and decoded."""

    root: Location  # a folder, or a bucket prefix (trainables/data/roots.py)
    manifest: Location | None = None  # CSV or Parquet with path,label[,split]
    val_fraction: float = Field(0.2, ge=0.15, le=0.30)  # of what the test split leaves
    # Held out by path hash before anything else, scored only on the exported model after
    # the search (trainables/data/holdout.py:carve_test); 0 for none. docs/numbers.md.
    test_fraction: float = Field(0.15, ge=0.0, le=0.30)
    image_size: int = Field(224, ge=16, le=1024)
    resize_mode: Literal["center_crop", "pad"] = "center_crop"
    strict: bool = False  # fail on any corrupt file instead of skipping and listing it
    max_image_pixels: int = Field(89_478_485, gt=0)  # PIL's decompression-bomb default
    # Read every file again instead of reusing the scan cache's rows for files whose path,
    # size and mtime are unchanged (search/scan_cache.py says when that is not enough).
    rescan: bool = False
    # DataLoader processes per training worker; "auto" derives them (and torch's threads)
    # from the CPUs the worker holds (trainables/data/loaders.py:loader_plan).
    num_workers: Union[Annotated[int, Field(ge=0, le=64)], Literal["auto"]] = "auto"
    # dataloader: torch's DataLoader over the image files. ray_data: root is a pack
    # (`tunecv data pack`), streamed by Ray Data's tasks (trainables/data/stream.py).
    loader: Literal["dataloader", "ray_data"] = "dataloader"


class ModelConfig(_Frozen):
    """Which timm backbone, how it is initialised, and how much of it trains."""

    backbone: Annotated[str, AfterValidator(lambda name: check_backbone_name(name) or name)] = "resnet10t"
    pretrained: bool = True
    weights_file: Path | None = None  # local .safetensors/.pth for this one backbone; else the hub
    weights_dir: Path | None = None  # <weights_dir>/<timm name>.safetensors for each backbone searched
    unfreeze_depth: Union[int, Literal["all"]] = "all"
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("unfreeze_depth")
    @classmethod
    def _non_negative_depth(cls, depth: int | str) -> int | str:
        if isinstance(depth, int) and depth < 0:
            raise ValueError(
                f"unfreeze_depth counts parameter groups from the top and cannot be "
                f"negative, got {depth}. Use 0 for head only or 'all'."
            )
        return depth

    @model_validator(mode="after")
    def _frozen_needs_pretrained(self) -> ModelConfig:
        if not self.pretrained and self.unfreeze_depth != "all":
            raise ValueError(
                f"unfreeze_depth {self.unfreeze_depth} freezes groups of '{self.backbone}', but pretrained is "
                "false: frozen random weights never learn (depth 0 predicts one class). Set unfreeze_depth: "
                "all to train from scratch, or pretrained: true (with weights_file) to fine-tune."
            )
        return self

    @model_validator(mode="after")
    def _weights_need_pretrained(self) -> ModelConfig:
        given = [key for key in ("weights_file", "weights_dir") if getattr(self, key) is not None]
        if given and not self.pretrained:
            raise ValueError(
                f"{given[0]} is set but pretrained is false: the weights would be ignored. "
                f"Set pretrained: true to load them, or remove {given[0]}."
            )
        if len(given) == 2:
            raise ValueError(
                "weights_file and weights_dir are both set. Use weights_file for one backbone, or "
                "weights_dir holding <timm name>.safetensors for each backbone a search may pick."
            )
        return self


class OptimConfig(_Frozen):
    """AdamW with discriminative learning rates, warmup + cosine, AMP, accumulation."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=2, le=8192)
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    lr_head: float = Field(1e-3, gt=0.0, le=10.0)
    lr_base: float = Field(1e-4, gt=0.0, le=10.0)
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)  # cosine floor as a fraction of peak
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    balanced_sampler: bool = False  # WeightedRandomSampler with inverse class frequency
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs "
                f"({self.epochs}), or the cosine decay never starts. Lower warmup_epochs."
            )
        return self


class LossConfig(_Frozen):
    """The training loss. Validation loss is always plain cross-entropy (comparable)."""

    type: Annotated[str, AfterValidator(lambda name: _check_loss_name(name) or name)] = "ce"
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # label_smoothing only
    gamma: float = Field(2.0, ge=0.0, le=10.0)  # focal only
    alpha: Union[Literal["balanced"], list[float], None] = None  # focal per-class weights

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, alpha):  # noqa: ANN001, ANN206 - pydantic signature
        if isinstance(alpha, list) and any(a <= 0 for a in alpha):
            raise ValueError(f"focal alpha weights must all be > 0, got {alpha}.")
        return alpha


class AugmentConfig(_Frozen):
    """Training-time augmentation. Validation never sees any of it."""

    strength: float = Field(1.0, ge=0.0, le=3.0)  # scales every magnitude; 0 = resize only
    hflip: bool = True  # turn off for digits, text, anything chiral
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    coarse_dropout_p: float = Field(0.3, ge=0.0, le=1.0)
    scale_min: float = Field(0.8, gt=0.0, le=1.0)  # RandomResizedCrop lower area bound


class ScalingConfig(_Frozen):
    """How many training processes a trial uses. 0 workers = in-process, no Ray Train."""

    num_workers: int = Field(0, ge=0, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)


class TrialConfig(_Frozen):
    """Everything one fine-tuning trial needs, fully resolved."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)


def _check_loss_name(name: str) -> None:
    from trainables.training.losses import check_loss_name  # the registry imports torch: only when parsing

    check_loss_name(name)


@functools.cache
def _timm_model_names() -> frozenset[str]:
    import timm  # deferred: importing timm costs ~1 s, not needed to parse a config

    return frozenset(timm.list_models())


def check_backbone_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a timm architecture (optionally ``.tag``).

    Args:
        name: A full timm name such as ``efficientnet_b2`` or ``resnet50.a1_in1k``.

    Raises:
        ValueError: Unknown name; the message suggests the closest timm names.
    """
    arch = name.split(".", 1)[0]
    known = _timm_model_names()
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    raise ValueError(f"unknown backbone '{name}': not a timm model.{hint}")
