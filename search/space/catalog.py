"""The shipped spaces: finding one by name or by data size, and loading a file with clear errors.

This module owns ``spaces/`` as a catalogue (names, the dataset-size tiers behind
``--space auto``) and reading a space file into a validated ``SearchSpace``, with every
problem reported under its field path in the user's YAML words. What a space means,
and how it becomes Optuna parameters, lives in ``search/space/model.py``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import ValidationError

from search.space.model import (
    FORM_TAGS,
    BackboneChoice,
    LossChoice,
    RatioRange,
    SearchSpace,
    SpaceError,
    UniformRange,
    WarmStartRecipe,
)

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"

# (exclusive upper bound on training images, or None for no bound; space name), for
# pretrained weights (the reference guide's tiers) and for training from random init.
TIERS: tuple[tuple[int | None, str], ...] = (
    (1_000, "tier_lt1k"), (10_000, "tier_1k_10k"), (100_000, "tier_10k_100k"), (None, "tier_gt100k"),
)
SCRATCH_TIERS: tuple[tuple[int | None, str], ...] = ((10_000, "scratch_lt10k"), (None, "scratch_ge10k"))
_TIER_REASONS = {  # one line per tier: the reference guide's decision framework, then from scratch
    "tier_lt1k": "under 1K images: EfficientNet-B0 / ResNet-50, frozen or shallow-unfrozen "
    "backbone, heavy augmentation",
    "tier_1k_10k": "1K-10K images: EfficientNet-B2/B3 or ResNet-50, fine-tune the top layers",
    "tier_10k_100k": "10K-100K images: ConvNeXt-Small or ViT-Base, full or deep fine-tuning",
    "tier_gt100k": "over 100K images: ViT-Large or Swin-Large, full fine-tuning",
    "scratch_lt10k": "no pretrained weights, under 10K images: small CNNs, every group trained",
    "scratch_ge10k": "no pretrained weights, 10K images or more: mid-size CNNs, every group trained",
}

def available_spaces() -> list[str]:
    """Names of the spaces shipped in ``spaces/`` (file stems), sorted."""
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def resolve_space_name(
    name_or_path: str, num_train_images: int | None = None, pretrained: bool = True
) -> tuple[Path, str]:
    """Find the file for ``--space``: a shipped name, a ``.yaml`` path, or ``auto``.

    Args:
        name_or_path: ``"demo"``, ``"tier_1k_10k"``, ``"auto"`` or a path to a YAML file.
        num_train_images: Training-set size; needed only for ``"auto"``.
        pretrained: Whether the run has pretrained weights (``model.pretrained``); ``auto``
            picks a from-scratch tier without them.

    Returns:
        The file, and one line saying which space was picked and why.

    Raises:
        SpaceError: Unknown name, missing file, or ``auto`` without an image count.
    """
    if name_or_path == "auto":
        if num_train_images is None or num_train_images < 0:
            raise SpaceError(f"--space auto picks a tier by the number of training images, got "
                             f"{num_train_images!r}; pass the count, or name a space such as "
                             f"'tier_1k_10k'.")
        tiers = TIERS if pretrained else SCRATCH_TIERS
        name = next(name for bound, name in tiers if bound is None or num_train_images < bound)
        why = f"{num_train_images:,} training images -> {name} ({_TIER_REASONS[name]})"
        return SPACES_DIR / f"{name}.yaml", f"--space auto: {why}"
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise SpaceError(f"--space {name_or_path}: no such file; check the path, or use one "
                             f"of {available_spaces()} or 'auto'.")
        return path, f"--space {name_or_path}: search space file {path}"
    path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(f"--space {name_or_path}: unknown search space; available: "
                         f"{available_spaces()}, 'auto' (picked by training-set size), or a path "
                         f"to a .yaml file.")
    return path, f"--space {name_or_path}: {path}"


def load_space(path: Path, *, check_depths: bool = True) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Args:
        path: The YAML file (``spaces/README.md`` describes the format).
        check_depths: Build each backbone on the meta device to check its unfreeze depths
            against its coarse parameter groups (0.1-0.6 s per backbone).

    Returns:
        The validated space.

    Raises:
        SpaceError: The file is unreadable, not YAML, or invalid; lists every problem.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpaceError(f"cannot read search space '{path}': {err.strerror}; check the path.") from err
    return parse_space(text, path, check_depths=check_depths)


def parse_space(text: str, source: str | Path, *, check_depths: bool = True) -> SearchSpace:
    """Validate a search space's YAML text (``source`` names it in messages); see ``load_space``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"search space {source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {source} must be a YAML mapping with backbones, lr_head, "
                         f"lr_base and losses; got {type(raw).__name__}. See spaces/README.md.")
    try:
        return SearchSpace.model_validate(raw, context={"check_depths": check_depths})
    except ValidationError as err:
        raise SpaceError(_format_errors(err, source)) from err


_KNOWN_KEYS = sorted({key for model in (SearchSpace, BackboneChoice, LossChoice, RatioRange,
                                         UniformRange, WarmStartRecipe) for key in model.model_fields})
_FRIENDLY = {  # pydantic's wording speaks of Python types; users wrote YAML
    "missing": "required but missing; add it (spaces/README.md shows an example)",
    "tuple_type": "expected a list, e.g. [2, all] or [32, 64]",
    "too_short": "empty list; give at least one value",
    "dict_type": "expected a mapping of `key: value` entries (spaces/README.md shows its shape)",
    "model_type": "expected a mapping of `key: value` entries (spaces/README.md shows its shape)",
}


def _format_errors(err: ValidationError, source: str | Path) -> str:
    lines = [f"invalid search space {source}:"]
    for error in err.errors():
        loc = _loc_path(error["loc"])
        for line in _error_message(error).splitlines():
            # Our own validators already start each line with its full field path.
            lines.append(f"  - {line}" if loc == "" or line.startswith(loc) else f"  - {loc}: {line}")
    lines.append("See spaces/README.md for the format.")
    return "\n".join(lines)


def _error_message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _KNOWN_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key; remove it or fix its spelling{hint}."
    if kind in _FRIENDLY:
        return _FRIENDLY[kind]
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    return message if kind == "value_error" or isinstance(got, dict) else f"{message} (got {got!r})"


def _loc_path(loc: tuple) -> str:
    if loc[:1] == ("lr_base",) and len(loc) > 1 and loc[1] in FORM_TAGS:
        loc = loc[:1] + loc[2:]  # the union's branch tag is not a key the user wrote
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
