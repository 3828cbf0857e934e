"""The problems a search-space file can have, each one message naming its path and fix:
names a registry does not know, unfreeze depths beyond a backbone's parameter groups,
values a trial would refuse, and points (warm-start recipes, enqueued parameters) that do
not fit the space. ``search/space/model.py`` collects them and raises ``SpaceError``."""

from __future__ import annotations

import functools

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from pydantic import ValidationError


def unknown_name(check, name: str) -> str | None:
    """What ``check`` (a registry's name check) says is wrong with ``name``; None if it is known."""
    try:
        check(name)
    except ValueError as err:
        return str(err)
    return None


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def distribution(spec) -> BaseDistribution:
    """An Optuna distribution for a space entry: a range (``UniformRange``) or a tuple of choices."""
    if hasattr(spec, "low"):  # a UniformRange or LogRange (model.py's; not imported here: it imports this)
        return FloatDistribution(spec.low, spec.high, log=spec.log)
    return CategoricalDistribution(spec)


@functools.cache
def group_count(backbone: str) -> int:
    """Coarse parameter groups of ``backbone``, counted without allocating its weights."""
    import timm  # deferred: timm and torch take seconds to import; only depth checks need them
    import torch

    from trainables.model.backbones import param_groups

    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, num_classes=2)
    except Exception:  # noqa: BLE001 - some inits use ops meta tensors lack; build for real
        model = timm.create_model(backbone, pretrained=False, num_classes=2)
    return len(param_groups(model).groups)


def depth_problems(backbone: str, depths: tuple) -> list[str]:
    path = f"backbones.{backbone}.unfreeze_depth"
    try:
        n_groups = group_count(backbone)
    except Exception as err:  # noqa: BLE001 - listed as a problem with the others
        return [f"{path}: could not build '{backbone}' to count its parameter groups "
                f"({type(err).__name__}: {err}); pick another backbone."]
    too_deep = [depth for depth in depths if depth != "all" and depth > n_groups]
    return [f"{path}: {depth} exceeds the {n_groups} coarse parameter groups of '{backbone}' "
            f"(allowed 0..{n_groups} or 'all')." for depth in too_deep]


def trial_limit_problems(trial_field: tuple[str, type, str], path: str, values: tuple) -> list[str]:
    """Values outside what the trial's config (``trial_field``: section, its config class,
    field) accepts: checked against the trial's own limits, not a copy of them."""
    section, config_cls, field = trial_field
    problems = []
    for value in values:
        try:
            config_cls(**{field: value})
        except ValidationError as err:
            reason = err.errors()[0]["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {value:g} is outside what a trial accepts for "
                            f"{section}.{field} ({reason}); change it.")
    return problems


def point_problems(point: dict, dists: dict, path: str, shown: dict | None = None) -> list[str]:
    """Entries of ``point`` missing from, foreign to, or outside the parameters ``dists``."""
    label = {name: (shown or {}).get(name, name) for name in {*dists, *point}}
    problems = [f"{path}.{label[name]}: missing; this space searches it ({describe_distribution(dist)}), "
                f"so give a value." for name, dist in dists.items() if name not in point]
    for name, value in point.items():
        where, dist = f"{path}.{label[name]}", dists.get(name)
        if dist is None:
            problems.append(f"{where}: not a parameter of this space for this backbone and loss "
                            f"(its parameters: {sorted(label[n] for n in dists)}); remove it.")
        elif isinstance(dist, CategoricalDistribution):
            if isinstance(value, bool) or value not in dist.choices:  # True == 1 in Python
                problems.append(f"{where}: {value!r} is not {describe_distribution(dist)}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}.")
        elif not dist.low <= value <= dist.high:
            problems.append(f"{where}: {value:g} is outside {describe_distribution(dist)}.")
    return problems


def describe_distribution(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"one of {list(dist.choices)}"
    return f"{dist.low:g}..{dist.high:g}"
