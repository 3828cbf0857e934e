"""Named search spaces: YAML files a user edits, turned into Optuna define-by-run searches.

This module owns the search-space file format (described for users in
``spaces/README.md``), its validation before any compute, the Optuna parameters a space
suggests (conditional ones only on their branch), the way back from a trial's flat
Optuna parameters to nested ``TrialConfig`` overrides. Finding and loading space files
lives in ``search/space/catalog.py``. It does not read the run file, merge overrides or
start Ray: the searcher calls ``define_by_run`` on each trial it asks the study for,
and the driver enqueues ``warm_start_points()`` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Optional, Union

from optuna.distributions import BaseDistribution, CategoricalDistribution
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag
from pydantic import PlainValidator, ValidationInfo, create_model, field_validator, model_validator

from search.space.checks import (
    depth_problems, distribution, point_problems, raise_if, trial_limit_problems, unknown_name,
)
from trainables.config import AugmentConfig, LossConfig, OptimConfig
from trainables.config import check_backbone_name
from trainables.training.losses import LOSSES, check_loss_name

if TYPE_CHECKING:
    import optuna

# Optuna parameter names. Only the unfreeze depth has different choices per branch, so
# only it carries the branch (the backbone) in its name; a loss's own parameters
# (smoothing, gamma: the registry's ``LossSpec.params``) each belong to a single loss
# and keep plain names.
BACKBONE, LOSS, LR_HEAD, LR_BASE = "backbone", "loss", "lr_head", "lr_base"
LR_BASE_RATIO = "lr_base_ratio"
BATCH_SIZE, WEIGHT_DECAY, AUGMENT_STRENGTH = "batch_size", "weight_decay", "augment_strength"
LOSS_PARAMS = tuple(sorted({param for spec in LOSSES.values() for param in spec.params}))

# Where each searched value lands in the trial config: ranges are checked against the
# limits the trial itself enforces rather than a second copy of them.
_TRIAL_FIELDS = {
    LR_HEAD: ("optim", OptimConfig, "lr_head"),
    LR_BASE: ("optim", OptimConfig, "lr_base"),
    BATCH_SIZE: ("optim", OptimConfig, "batch_size"),
    WEIGHT_DECAY: ("optim", OptimConfig, "weight_decay"),
    AUGMENT_STRENGTH: ("augment", AugmentConfig, "strength"),
    **{param: ("loss", LossConfig, param) for param in LOSS_PARAMS},
}


class SpaceError(ValueError):
    """A search space is invalid; the message lists each field path, the problem and the fix."""


def unfreeze_depth_param(backbone: str) -> str:
    """The Optuna parameter holding ``backbone``'s unfreeze depth."""
    return f"unfreeze_depth__{backbone}"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class UniformRange(_Frozen):
    """A float range sampled uniformly, bounds included."""

    log: ClassVar[bool] = False
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> UniformRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is greater than high ({self.high:g}); swap them.")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {self.low:g}; use a small "
                             f"positive value such as 1.0e-6.")
        return self


class LogRange(UniformRange):
    """A float range sampled log-uniformly; bounds must be > 0."""

    log: ClassVar[bool] = True


class RatioRange(_Frozen):
    """``lr_base`` searched as a log-uniform multiple of ``lr_head``."""

    ratio: LogRange


def _lr_base_form(value: Any) -> str:
    is_ratio = isinstance(value, RatioRange) or (isinstance(value, dict) and "ratio" in value)
    return "ratio" if is_ratio else "absolute"


FORM_TAGS = ("absolute", "ratio")  # union branch tags, dropped from error paths
LrBase = Annotated[
    Union[Annotated[LogRange, Tag("absolute")], Annotated[RatioRange, Tag("ratio")]],
    Discriminator(_lr_base_form),
]


def _depth(value: Any) -> int | str:
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"{value!r} is not an unfreeze depth: use a count of coarse parameter groups "
                     f"from the top (0 = head only, 1, 2, ...) or 'all' for everything.")


Depth = Annotated[Union[int, str], PlainValidator(_depth)]


class BackboneChoice(_Frozen):
    """One backbone in a space: the unfreeze depths to try with it."""

    unfreeze_depth: Annotated[tuple[Depth, ...], Field(min_length=1)]


class _LossChoice(_Frozen):
    @model_validator(mode="before")
    @classmethod
    def _bare_key(cls, value: Any) -> Any:
        return {} if value is None else value  # `ce:` with nothing after it means `ce: {}`

    def searched(self) -> dict[str, UniformRange]:
        """The loss parameters this space searches, by Optuna name."""
        ranges = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: rng for name, rng in ranges.items() if rng is not None}


# One field per loss parameter of the registry: ``smoothing: {low, high}`` and so on.
LossChoice = create_model(
    "LossChoice", __base__=_LossChoice, __doc__="One loss in a space, with the ranges of its own "
    "parameters if they are searched.", **{param: (Optional[UniformRange], None) for param in LOSS_PARAMS},
)

class _WarmStartRecipe(_Frozen):
    backbone: str
    loss: str
    unfreeze_depth: Depth | None = None
    lr_head: float | None = None
    lr_base: float | None = None
    lr_base_ratio: float | None = None
    batch_size: StrictInt | None = None
    weight_decay: float | None = None
    augment_strength: float | None = None

    def point(self) -> dict[str, Any]:
        """The recipe as flat Optuna parameters, named as ``define_by_run`` names them."""
        point = self.model_dump(exclude_none=True)
        if "unfreeze_depth" in point:
            point[unfreeze_depth_param(self.backbone)] = point.pop("unfreeze_depth")
        return point


WarmStartRecipe = create_model(
    "WarmStartRecipe", __base__=_WarmStartRecipe, __doc__="A complete point evaluated before the "
    "sampler takes over: every searched value is given.",
    **{param: (Optional[float], None) for param in LOSS_PARAMS},
)


class SearchSpace(_Frozen):
    """A parsed, validated search space (one YAML file in ``spaces/``)."""

    description: str = ""
    # Whether the space fine-tunes pretrained weights (it may freeze groups) or trains
    # from random init (every group trains: a frozen random group only adds noise).
    needs_pretrained: bool
    backbones: dict[str, BackboneChoice]
    lr_head: LogRange
    lr_base: LrBase
    losses: dict[str, LossChoice]
    batch_size: Annotated[tuple[StrictInt, ...], Field(min_length=1)] | None = None
    weight_decay: LogRange | None = None
    augment_strength: UniformRange | None = None
    warm_start: tuple[WarmStartRecipe, ...] = ()

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, backbones: dict, info: ValidationInfo) -> dict:
        if not backbones:
            raise ValueError("backbones: empty; list at least one timm name, e.g. "
                             "`resnet50: {unfreeze_depth: [all]}`.")
        problems = []
        for name, choice in backbones.items():
            if unknown := unknown_name(check_backbone_name, name):
                problems.append(f"backbones.{name}: {unknown} Fix the name or remove the entry.")
            elif (info.context or {}).get("check_depths", True):
                problems += depth_problems(name, choice.unfreeze_depth)
        raise_if(problems)
        return backbones

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: dict) -> dict:
        if not losses:
            raise ValueError(f"losses: empty; list at least one of {list(LOSSES)}, e.g. `ce: {{}}`.")
        problems = []
        for name, choice in losses.items():
            if unknown := unknown_name(check_loss_name, name):
                problems.append(f"losses.{name}: {unknown}")
                continue
            for param in choice.searched():
                if param not in LOSSES[name].params:
                    owner = next(loss for loss, spec in LOSSES.items() if param in spec.params)
                    problems.append(f"losses.{name}.{param}: {param} only applies to the '{owner}' "
                                    f"loss; remove it here or move it under losses.{owner}.")
        raise_if(problems)
        return losses

    @model_validator(mode="after")
    def _cross_checks(self) -> SearchSpace:
        problems = self._trial_limit_problems()
        if not self.needs_pretrained:
            problems += [f"backbones.{name}.unfreeze_depth: {list(choice.unfreeze_depth)} freezes groups of "
                         f"random weights (needs_pretrained: false), which then never learn; use [all], or set "
                         f"needs_pretrained: true for a space that fine-tunes pretrained weights."
                         for name, choice in self.backbones.items() if set(choice.unfreeze_depth) != {"all"}]
        for i, recipe in enumerate(self.warm_start):
            problems += self._recipe_problems(recipe, f"warm_start[{i}]")
        raise_if(problems)
        return self

    def _trial_limit_problems(self) -> list[str]:
        """Values the trial config would reject, found before any trial spends compute."""
        checks = []  # (parameter, field path, values)
        ranges = {LR_HEAD: self.lr_head, WEIGHT_DECAY: self.weight_decay,
                  AUGMENT_STRENGTH: self.augment_strength}
        if isinstance(self.lr_base, RatioRange):
            # lr_base = lr_head * ratio, so its extremes are the products of the bounds.
            ratio = self.lr_base.ratio
            extremes = (self.lr_head.low * ratio.low, self.lr_head.high * ratio.high)
            checks.append((LR_BASE, "lr_base.ratio (times lr_head)", extremes))
        else:
            ranges[LR_BASE] = self.lr_base
        checks += [(p, p, (r.low, r.high)) for p, r in ranges.items() if r is not None]
        for loss, choice in self.losses.items():
            checks += [(p, f"losses.{loss}.{p}", (r.low, r.high)) for p, r in choice.searched().items()]
        if self.batch_size is not None:
            checks.append((BATCH_SIZE, BATCH_SIZE, self.batch_size))
        return [problem for param, path, values in checks
                for problem in trial_limit_problems(_TRIAL_FIELDS[param], path, values)]

    def _recipe_problems(self, recipe: WarmStartRecipe, path: str) -> list[str]:
        for key, options in ((BACKBONE, self.backbones), (LOSS, self.losses)):
            if getattr(recipe, key) not in options:
                return [f"{path}.{key}: {getattr(recipe, key)!r} is not in this space "
                        f"({list(options)}); pick one of those or add it to the space."]
        shown = {unfreeze_depth_param(recipe.backbone): "unfreeze_depth"}
        dists = self._distributions(recipe.backbone, recipe.loss)
        return point_problems(recipe.point(), dists, path, shown)

    def backbone_names(self) -> list[str]:
        """The backbones this space chooses from, in file order."""
        return list(self.backbones)

    def _distributions(self, backbone: str, loss: str) -> dict[str, BaseDistribution]:
        """Every parameter a trial with this backbone and loss gets, by Optuna name."""
        ratio_form = isinstance(self.lr_base, RatioRange)
        lr_base = {LR_BASE_RATIO: self.lr_base.ratio} if ratio_form else {LR_BASE: self.lr_base}
        specs = {
            BACKBONE: tuple(self.backbones),
            unfreeze_depth_param(backbone): self.backbones[backbone].unfreeze_depth,
            LR_HEAD: self.lr_head,
            **lr_base,
            LOSS: tuple(self.losses),
            **self.losses[loss].searched(),
            BATCH_SIZE: self.batch_size,
            WEIGHT_DECAY: self.weight_decay,
            AUGMENT_STRENGTH: self.augment_strength,
        }
        return {name: distribution(spec) for name, spec in specs.items() if spec is not None}

    def define_by_run(self, trial: optuna.Trial) -> None:
        """Suggest every parameter of this space; branch parameters only on their branch.

        Args:
            trial: An Optuna trial, Ray's wrapper of one, or an ``optuna.trial.FixedTrial``.
        """
        backbone = trial.suggest_categorical(BACKBONE, self.backbone_names())
        loss = trial.suggest_categorical(LOSS, list(self.losses))
        for name, dist in self._distributions(backbone, loss).items():
            if name in (BACKBONE, LOSS):
                continue
            if isinstance(dist, CategoricalDistribution):
                trial.suggest_categorical(name, dist.choices)
            else:
                trial.suggest_float(name, dist.low, dist.high, log=dist.log)

    def to_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Turn a trial's flat Optuna parameters into nested ``TrialConfig`` overrides.

        Args:
            params: Exactly the parameters ``define_by_run`` suggested (Tune's trial config).

        Returns:
            ``{"model": ..., "optim": ..., "loss": ...[, "augment": ...]}`` holding only
            searched fields; every other field keeps the run config's value.

        Raises:
            SpaceError: A parameter is missing, unexpected, or outside this space.
        """
        backbone, loss = params.get(BACKBONE), params.get(LOSS)
        if backbone not in self.backbones or loss not in self.losses:
            raise SpaceError(f"params: backbone {backbone!r} and loss {loss!r} must be choices of "
                             f"this space ({self.backbone_names()}, {list(self.losses)}); pass the "
                             f"parameters define_by_run suggested for this same space.")
        problems = point_problems(params, self._distributions(backbone, loss), "params")
        if problems:
            raise SpaceError("trial parameters do not fit the search space:\n  - "
                             + "\n  - ".join(problems))
        lr_head = params[LR_HEAD]
        lr_base = lr_head * params[LR_BASE_RATIO] if LR_BASE_RATIO in params else params[LR_BASE]
        optim = {"lr_head": lr_head, "lr_base": lr_base}
        optim.update({key: params[key] for key in (BATCH_SIZE, WEIGHT_DECAY) if key in params})
        overrides = {
            "model": {"backbone": backbone, "unfreeze_depth": params[unfreeze_depth_param(backbone)]},
            "optim": optim,
            "loss": {"type": loss, **{p: params[p] for p in self.losses[loss].searched()}},
        }
        if AUGMENT_STRENGTH in params:
            overrides["augment"] = {"strength": params[AUGMENT_STRENGTH]}
        return overrides

    def fit_point(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Keep what this space can still suggest of another space's trial parameters.

        For a retrain's warm start: the champion's search may have had another space.
        A backbone or loss this space lacks is dropped with the parameters that hang on
        it; any other parameter this space does not search, or whose value falls outside
        its range, is dropped too. Optuna samples what is dropped.

        Returns:
            (the point to enqueue, {dropped parameter: why}).
        """
        backbone, loss = params.get(BACKBONE), params.get(LOSS)
        dists = self._distributions(backbone if backbone in self.backbones else next(iter(self.backbones)),
                                    loss if loss in self.losses else next(iter(self.losses)))
        if backbone not in self.backbones:  # its unfreeze depth means nothing without it
            dists = {n: d for n, d in dists.items() if n != BACKBONE and not n.startswith(unfreeze_depth_param(""))}
        if loss not in self.losses:
            dists = {n: d for n, d in dists.items() if n != LOSS and n not in LOSS_PARAMS}
        point, dropped = {}, {}
        for name, value in params.items():
            problems = point_problems({name: value}, {name: dists[name]}, "") if name in dists else [
                f".{name}: {value!r} is not a {name} of this space" if name in (BACKBONE, LOSS)
                else f".{name}: this space does not search it"]
            if problems:
                dropped[name] = problems[0].removeprefix(f".{name}: ")
            else:
                point[name] = value
        return point, dropped

    def distributions_of(self, point: dict[str, Any]) -> dict[str, BaseDistribution] | None:
        """Every distribution a trial with the point's backbone and loss has (more names
        than the point when it is partial); None when it names no backbone or loss of
        this space."""
        if point.get(BACKBONE) not in self.backbones or point.get(LOSS) not in self.losses:
            return None
        return self._distributions(point[BACKBONE], point[LOSS])

    def warm_start_points(self) -> list[dict[str, Any]]:
        """The warm-start recipes as flat Optuna parameters, in file order.

        Ready for ``OptunaSearch(points_to_evaluate=...)``, which enqueues each one. Each
        point is complete, so ``to_overrides`` accepts it as it is.
        """
        return [recipe.point() for recipe in self.warm_start]
