"""Backbone creation, pretrained-weight loading and freezing by unfreeze depth.

This module owns everything about the network itself: building a timm model with a
fresh head, loading pretrained weights from a local file or the hub (and refusing to
fall back to random init when the config says pretrained), splitting the parameters
into head and base, and freezing all but the top ``unfreeze_depth`` coarse groups.
It does not build optimizers or loaders.

Unfreeze depth is counted in timm's coarse parameter groups (``model.group_matcher``)
with the classifier removed, from the top: for ``resnet50`` the groups are
stem, layer1..layer4, so depth 1 trains layer4 + fc and depth 5 is everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainables.config import ModelConfig
from trainables.errors import FinalTrialError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded."""


class WeightsFileError(PretrainedWeightsError, FinalTrialError):
    """A local weights file is missing, unreadable or holds another model: every attempt
    would fail the same way (a hub download may fail once and work on a retry)."""


@dataclass(frozen=True)
class ParamGroups:
    """Parameter names of the classifier head and of the backbone's coarse groups."""

    head: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # bottom (stem) first, head excluded


def create_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.backbone`` with a ``num_classes`` head, loading weights if asked.

    Args:
        cfg: The model section of a trial config.
        num_classes: Size of the new classifier head.

    Returns:
        The timm model, frozen according to ``cfg.unfreeze_depth``.

    Raises:
        PretrainedWeightsError: ``pretrained`` is true and no weights could be loaded.
        ValueError: ``unfreeze_depth`` exceeds the backbone's group count.
    """
    import timm

    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate}
    weights = local_weights(cfg)
    if not cfg.pretrained:
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    elif weights is not None:
        model = _create_from_file(cfg.backbone, weights, kwargs)
    else:
        model = _create_from_hub(cfg.backbone, kwargs)
    apply_unfreeze_depth(model, cfg.unfreeze_depth)
    return model


def local_weights(cfg: ModelConfig) -> Path | None:
    """The local file ``cfg.backbone`` loads: ``weights_file``, or in ``weights_dir`` the
    ``<backbone><suffix>`` for the first suffix present (safetensors first, and its name
    when none is, so an error can say what to put there); None for the hub."""
    if cfg.weights_file is not None:
        return Path(cfg.weights_file)
    if cfg.weights_dir is None:
        return None
    candidates = [Path(cfg.weights_dir) / f"{cfg.backbone}{suffix}" for suffix in WEIGHT_SUFFIXES]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _create_from_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    import timm

    if not path.is_file():
        raise WeightsFileError(
            f"weights file '{path}' for '{name}' does not exist. Put a local "
            f"{'/'.join(WEIGHT_SUFFIXES)} file for '{name}' there, or set pretrained: false."
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsFileError(
            f"weights file '{path}' has suffix '{path.suffix}'; expected one of "
            f"{WEIGHT_SUFFIXES} (safetensors preferred)."
        )
    # timm's loader reads .safetensors with safetensors and anything else with
    # torch.load(weights_only=True), so a local file is never unpickled as code.
    try:
        state_dict = timm.models.load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways
        if _refused_pickle(err):
            raise WeightsFileError(_pickle_refusal(name, path)) from err
        raise WeightsFileError(f"could not read weights file '{path}': {err}") from err
    model = timm.create_model(name, pretrained=False, **kwargs)
    _load_backbone_weights(model, state_dict, name, path)
    return model


def _refused_pickle(err: BaseException) -> bool:
    """torch.load(weights_only=True) met a pickled object that is not plain tensors
    (timm 1.0 wraps the UnpicklingError in a RuntimeError)."""
    import pickle

    return isinstance(err, pickle.UnpicklingError) or isinstance(err.__cause__, pickle.UnpicklingError)


def _pickle_refusal(name: str, path: Path) -> str:
    """The refusal, without torch's "retry with weights_only=False": tunecv has no such
    option, by design, as that would run the file's code."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a legacy or odd file: the refusal stands without the names
        found = []
    named = f" ({', '.join(sorted(found)[:3])})" if found else ""
    return (f"weights file '{path}' holds pickled Python objects besides tensors{named}, and tunecv never "
            f"unpickles them: it loads only .safetensors files, or {'/'.join(WEIGHT_SUFFIXES[1:])} files of "
            "plain tensors. If you trust the file, convert it yourself: load it in Python, save its state dict "
            f"with safetensors.torch.save_file(state_dict, '{name}.safetensors'), and give that file instead.")


def _load_backbone_weights(model: nn.Module, state_dict: dict, name: str, path: Path) -> None:
    """Load every backbone tensor; the head is taken only if its shape fits.

    timm's own file loading only warns on unexpected keys, which would leave a model
    silently at random init when the file belongs to another architecture.
    """
    own = model.state_dict()
    _raise_on_mismatch(model, {k: tuple(v.shape) for k, v in state_dict.items()}, name, path)
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape},
                          strict=False)


def _raise_on_mismatch(model: nn.Module, found: dict[str, tuple[int, ...]], name: str, path: Path) -> None:
    """Raise unless ``found`` (tensor name -> shape) holds every backbone tensor of ``model``
    at its shape; the head may differ (it is replaced) or be absent."""
    head = set(param_groups(model).head)
    head_prefixes = tuple(n.rsplit(".", 1)[0] + "." for n in head)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in head}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in head and not k.startswith(head_prefixes)]
    wrong = [f"{k}: expected {expected[k]}, found {found[k]}" for k in expected if k in found
             and found[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(items)} {what} (e.g. {items[:2]})" for what, items in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)) if items]
        raise WeightsFileError(
            f"could not load weights for '{name}' from '{path}': tensors {'; '.join(parts)}. Check that the file "
            f"holds a '{name}' state dict."
        )


def check_weights_file(name: str, path: Path) -> None:
    """Check, without building the model or reading the tensors, that ``path`` holds
    ``name``'s backbone: a safetensors header read against the model built on the meta
    device. For the check before Ray starts; other suffixes are checked when loaded.

    Raises:
        PretrainedWeightsError: Unreadable, or tensors missing, unexpected or of another shape.
    """
    import timm
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as err:  # noqa: BLE001 - corrupt headers fail in many ways
        raise WeightsFileError(f"could not read weights file '{path}' as safetensors: {err}") from err
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    _raise_on_mismatch(model, found, name, path)


def _create_from_hub(name: str, kwargs: dict) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        # timm would log a warning and keep random init; a search must not do that.
        raise WeightsFileError(
            f"timm has no pretrained weights for '{name}'. Give model.weights_dir, pick "
            f"a tagged name (e.g. '{name}.<tag>'), or set pretrained: false."
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - hub failures come as many types
        raise PretrainedWeightsError(
            f"could not download pretrained weights for '{name}' ({type(err).__name__}: "
            f"{err}). Without network access, save the weights as <dir>/{name}.safetensors "
            f"and set model.weights_dir: <dir>, or set pretrained: false."
        ) from err


def param_groups(model: nn.Module) -> ParamGroups:
    """Split a timm model's parameter names into classifier head and coarse groups."""
    from timm.models._manipulate import group_parameters

    classifier = model.pretrained_cfg.get("classifier")
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    names = [n for n, _ in model.named_parameters()]
    head = tuple(n for n in names if any(n.startswith(f"{p}.") for p in prefixes))
    if not head:
        raise ValueError(
            f"could not find the classifier parameters of '{model.pretrained_cfg.get('architecture')}'"
            f" (timm classifier name {classifier!r}); this backbone is not supported."
        )
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    head_set = set(head)
    groups = []
    for _, members in sorted(grouped.items()):
        kept = tuple(n for n in members if n not in head_set)
        if kept:
            groups.append(kept)
    return ParamGroups(head=head, groups=tuple(groups))


def apply_unfreeze_depth(model: nn.Module, depth: int | str) -> ParamGroups:
    """Freeze all but the head and the top ``depth`` coarse groups.

    Args:
        model: A timm model.
        depth: 0 = head only, N = head + last N groups, ``"all"`` = everything.

    Returns:
        The model's parameter groups.

    Raises:
        ValueError: ``depth`` is larger than the backbone's number of groups.
    """
    groups = param_groups(model)
    n_groups = len(groups.groups)
    if depth == "all":
        trainable = {n for n, _ in model.named_parameters()}
    else:
        if not isinstance(depth, int) or depth < 0 or depth > n_groups:
            raise ValueError(
                f"unfreeze_depth must be between 0 and {n_groups} or 'all' for "
                f"'{model.pretrained_cfg.get('architecture')}' ({n_groups} parameter "
                f"groups), got {depth!r}."
            )
        trainable = set(groups.head)
        for group in groups.groups[n_groups - depth :]:
            trainable.update(group)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return groups


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, but BatchNorm layers with frozen parameters stay in eval.

    A frozen BN that kept updating its running statistics would drift away from the
    pretrained features that its frozen affine parameters were fitted to.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    """Return (total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def data_config(model: nn.Module) -> dict:
    """The backbone's preprocessing (mean, std, interpolation) from timm's pretrained cfg."""
    cfg = model.pretrained_cfg
    return {
        "mean": tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
