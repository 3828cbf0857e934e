"""The one place a run's YAML file becomes typed, frozen, validated objects.

A run file holds ``name`` and ``output_dir`` plus the trial sections (``data``,
``model``, ``optim``, ``loss``, ``augment``, ``scaling``) defined in
``trainables/config.py``. Loading checks everything that can be checked without
compute (unknown keys, types, ranges, backbone and loss names, that paths exist) and
raises one ``ConfigError`` listing every problem with its field and fix, before Ray or
torch spend anything. Relative paths are taken from the current working directory,
which is also the job's working directory under ``ray job submit``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainables.config import Location, TrialConfig
from trainables.data.locations import is_uri


class ConfigError(ValueError):
    """A run file is invalid; the message lists each field, the problem and the fix."""


class AshaConfig(BaseModel):
    """Asynchronous successive halving over epochs (max_t is ``optim.epochs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Epochs every trial gets before it can be stopped; null: half of optim.epochs. From
    # random init the first epochs rank recipes badly (bench/search_efficiency.py: at
    # a quarter of 8 epochs ASHA stopped the recipe that scored 0.95 when run in full).
    grace_period: int | None = Field(None, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class Int8Config(BaseModel):
    """Static int8 next to the fp32 ONNX model (``search/export/int8.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration_images: int = Field(256, ge=1, le=100_000)  # from the training split, never validation
    method: Literal["minmax", "entropy", "percentile"] = "minmax"  # ONNX Runtime's calibration method
    max_drop: float = Field(0.5, ge=0.0, le=100.0)  # macro-F1 points int8 may lose against fp32 and still ship
    seed: int = 0  # which training images calibrate


class FinalistsConfig(BaseModel):
    """``search.finalists``: after the search, the ``k`` best configurations train
    ``repeats`` more times with other seeds, and the best mean over all their runs wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(3, ge=0, le=20)  # 0 or 1: no finalists, the top trial is exported
    repeats: int = Field(2, ge=1, le=10)  # new runs of each finalist, seeds optim.seed + 1..repeats
    budget_share: float = Field(0.25, ge=0.0, lt=1.0)  # of search.time_budget_s, kept back for them
    # From this many validation images on, they run only when the leader is tied with the next (paired bootstrap).
    always_below: int = Field(2000, ge=0)
    ensemble: bool = True  # the winner's runs averaged, when that beats their mean (search/export/ensemble.py)

    @property
    def enabled(self) -> bool:
        return self.k >= 2


class SearchConfig(BaseModel):
    """How ``tunecv run`` searches: space, budget, searcher, scheduler, concurrency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: str = "auto"  # a name in spaces/, a YAML path, or 'auto' (tier by data size)
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent_trials: int = Field(2, ge=1, le=10_000)
    time_budget_s: float | None = Field(None, gt=0)
    searcher: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    seed: int = 0
    storage: str | None = None  # Optuna storage URL; default: a journal file in the run dir
    warm_start: bool = True  # evaluate the space's warm-start recipes first
    cpus_per_trial: float = Field(1.0, gt=0)  # in-process trials (scaling.num_workers: 0)
    max_failures: int = Field(2, ge=0, le=100)  # retries of a crashed trial, from its last epoch
    trial_timeout_s: float | None = Field(None, gt=0)  # each attempt's limit: past it (a hung step) it fails
    finalists: FinalistsConfig = Field(default_factory=lambda: FinalistsConfig())  # search/run/finalists.py
    export: bool = True  # export the winner to ONNX at the end of the run
    int8: Int8Config | None = None  # also a gated static int8 model in the export; null: fp32 only

    @model_validator(mode="after")
    def _storage_scheme(self) -> SearchConfig:
        if self.storage is None:
            return self
        if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", self.storage):
            raise ValueError(f"search.storage must be an SQLAlchemy URL such as postgresql://user@host/db or "
                             f"sqlite:///path.db, got {self.storage!r}.")
        from search.study import database_driver_problem  # optuna's import: only for a database

        if problem := database_driver_problem(self.storage):  # before any compute
            raise ValueError(f"search.storage: {problem}")
        return self


class RetrainConfig(BaseModel):
    """``tunecv retrain``: a search on a new data snapshot, warm-started from the champion's
    run, gated champion against challenger, registered in MLflow (``search/retrain/``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the registered model
    snapshot: Location  # the new snapshot's data root (a folder or a bucket prefix); it replaces data.root
    # The retrain's search budget; the first retrain of a model (no champion yet) uses
    # search.num_samples and search.time_budget_s, a full search.
    num_samples: int = Field(4, ge=1, le=100_000)
    # null: search.time_budget_s, so every retrain has the cap the first one had.
    time_budget_s: float | None = Field(None, gt=0)
    top_k: int = Field(3, ge=0, le=100)  # the champion run's best configurations, run first
    # The champion run's completed trials join the new study as history (marked with
    # their snapshot), so TPE starts from what they showed instead of from random points.
    history: bool = False
    # Macro-F1 the challenger must add. 0.005 (half a point), the docs' and configs'
    # value: a model change costs a deploy and a review, and a smaller gain is within
    # what a second seed of the same configuration moves (bench/results/selection.json).
    min_gain: float = Field(0.005, ge=0.0, le=1.0)
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0)  # most F1 any one class may lose
    # An MLflow tracking/registry URI; null: MLFLOW_TRACKING_URI when set, else an SQLite
    # registry at <output_dir>/mlflow.db (nothing to start on a workstation).
    registry_uri: str | None = None


class RunConfig(TrialConfig):
    """A whole run: where it goes, how it searches, plus the trial settings."""

    name: str = Field("tunecv", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # A local or shared-filesystem path, or an object-store URI (s3://bucket/runs,
    # gs://bucket/runs; anything pyarrow's FileSystem.from_uri opens).
    output_dir: str = "runs"
    search: SearchConfig = Field(default_factory=SearchConfig)
    retrain: RetrainConfig | None = None

    @property
    def asha_grace_period(self) -> int:
        """``search.asha.grace_period``, or half of ``optim.epochs`` when it is null."""
        return self.search.asha.grace_period or max(1, self.optim.epochs // 2)

    @model_validator(mode="after")
    def _across_sections(self) -> RunConfig:
        """Checks that span sections: each is a problem only in combination."""
        problems = []
        if self.search.scheduler == "asha" and self.asha_grace_period > self.optim.epochs:
            problems.append(f"search.asha.grace_period ({self.asha_grace_period}) exceeds optim.epochs "
                            f"({self.optim.epochs}); ASHA could never stop a trial. Lower grace_period.")
        if self.retrain is not None and self.data.manifest is not None:
            problems.append("data.manifest cannot be used with a retrain: section, whose snapshot is an image "
                            "folder that replaces data.root (the manifest would still list the old data). "
                            "Remove data.manifest.")
        if self.data.loader == "ray_data":
            problems += _ray_data_problems(self)
        if self.optim.precision == "fp16" and not self.scaling.use_gpu:
            problems.append("optim.precision fp16 needs scaling.use_gpu: true; on the CPU use bf16 or fp32.")
        if problems:
            raise ValueError(" ".join(problems))
        return self

    def trial(self) -> TrialConfig:
        """The trial part alone, as every trial receives it."""
        return TrialConfig(**{k: getattr(self, k) for k in TrialConfig.model_fields})


def _ray_data_problems(cfg: RunConfig) -> list[str]:
    """What ``data.loader: ray_data`` cannot be combined with (a pack holds its own split)."""
    fixes = {
        "data.manifest": (cfg.data.manifest is not None, "the pack holds its split; remove data.manifest"),
        "retrain": (cfg.retrain is not None, "a retrain's snapshot is an image folder; use data.loader: dataloader"),
        "optim.balanced_sampler": (cfg.optim.balanced_sampler, "a pack is streamed file by file; set it to false"),
    }
    return [f"{field} is not supported with data.loader ray_data: {fix}." for field, (bad, fix) in fixes.items()
            if bad]


def _pack_problems(cfg: RunConfig) -> list[str]:
    """``data.root`` is a pack exactly when ``data.loader`` is ray_data, and the pack's split
    was made with this run's ``data.val_fraction`` and ``optim.seed`` (one small read)."""
    from trainables.data.layouts import DataError
    from trainables.data.packs import PACK_JSON, is_pack, read_pack

    root = cfg.data.root
    if cfg.data.loader == "dataloader":
        if is_pack(root):
            return [f"  - data.loader: data.root '{root}' is a pack (it holds {PACK_JSON}); set data.loader: "
                    "ray_data to stream it, or point data.root at the images"]
        return []
    try:
        pack = read_pack(root)
    except DataError as err:
        return [f"  - data.root: {err}"]
    problems = []
    if pack.val_fraction is not None and pack.val_fraction != cfg.data.val_fraction:
        problems.append(f"  - data.val_fraction: {cfg.data.val_fraction} differs from the pack's {pack.val_fraction} "
                        f"(its split was made with it); set data.val_fraction: {pack.val_fraction}, or pack again")
    if pack.seed is not None and pack.seed != cfg.optim.seed:
        problems.append(f"  - optim.seed: {cfg.optim.seed} differs from the seed the pack's split was made with "
                        f"({pack.seed}); set optim.seed: {pack.seed}, or pack again with this seed")
    return problems


def _problems_message(source: str, problems: list[str]) -> str:
    """Every problem (``  - field: ...``) under a heading; one alone on the heading's line,
    so that a single mistake is a single line on the console."""
    if len(problems) == 1:
        return f"invalid config {source}: {problems[0].removeprefix('  - ')}"
    return "\n".join([f"invalid config {source}:", *problems])


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against the run-file reference, docs/run-file.md"
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return _problems_message(source, lines)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw mapping.

    Raises:
        ConfigError: An override is not of the form ``a.b=value``, or its value is not YAML.
    """
    for item in overrides:
        match = re.fullmatch(r"([A-Za-z_][\w.]*)=(.*)", item)
        if not match:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. optim.epochs=3")
        *parents, leaf = match.group(1).split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[leaf] = _override_value(match.group(1), match.group(2))
    return raw


def _override_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        # The parser's own message spans five lines with a caret; its first phrases say what is wrong.
        what = ": ".join(p for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        quoted = value.replace("'", "''")
        raise ConfigError(
            f"--set {key}: the value {value!r} is not valid YAML ({what or str(err).splitlines()[0]}); give a "
            f"complete YAML value (3, [1, 2], {{a: 1}}), or quote it to pass a string: --set \"{key}='{quoted}'\""
        ) from None


def _not_a_directory(path: Path) -> str:
    return "is a file, not a directory" if path.exists() else "does not exist"


def _location_problems(field: str, location: str, directory: bool) -> list[str]:
    """Why the data folder or file at ``location`` cannot be read, if it cannot. For an
    object-store URI this is one request (credentials and bucket; an object store has no
    empty folders, so a prefix exists when it holds a file)."""
    kind = "directory" if directory else "file"
    if not is_uri(location):
        path = Path(location)
        if (path.is_dir() if directory else path.is_file()):
            return []
        return [f"  - {field}: {kind} '{location}' " + (_not_a_directory(path) if directory else "does not exist")]
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(location)
        found = fs.get_file_info(path).type
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) for a URI it cannot open
        return [f"  - {field}: '{location}' cannot be read ({err}); check the URI, and the credentials this "
                "machine has for it"]
    wanted = pafs.FileType.Directory if directory else pafs.FileType.File
    if found != wanted:
        return [f"  - {field}: {kind} '{location}' " + ("holds no objects" if found == pafs.FileType.NotFound
                                                         else f"is not a {kind}")]
    return []


def _output_dir_problem(output_dir: str) -> str | None:
    """Why ``output_dir`` (a local path) cannot hold runs, if it cannot: checked here so
    that a bad one fails before Ray starts, not when the first file is written."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return f"  - output_dir: '{path}' is a file; give a directory for the runs"
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"  - output_dir: '{path}' cannot be created ('{existing}' is a file); give a directory"
    try:
        # A real file, not os.access: /proc passes os.access for root and refuses every
        # new file. Exclusive create (mkstemp), removed on close; output_dir itself is not made.
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".tunecv-write-check-"):
            pass
    except OSError as err:
        return (f"  - output_dir: '{path}' cannot be created or written (a test file in '{existing}' failed: "
                f"{err.strerror}); give a directory you can write to")
    return None


def _check_paths(cfg: RunConfig) -> list[str]:
    problems = []
    if not is_uri(cfg.output_dir) and (problem := _output_dir_problem(cfg.output_dir)):
        problems.append(problem)
    problems += _location_problems("data.root", cfg.data.root, directory=True) or _pack_problems(cfg)
    if cfg.data.manifest is not None:
        problems += _location_problems("data.manifest", cfg.data.manifest, directory=False)
    if cfg.model.weights_file is not None and not cfg.model.weights_file.is_file():
        problems.append(
            f"  - model.weights_file: file '{cfg.model.weights_file}' does not exist; "
            "give a local weights file or remove the key"
        )
    if cfg.retrain is not None:
        problems += [f"{problem}; give the new snapshot's data root (class folders, as data.root)"
                     for problem in _location_problems("retrain.snapshot", cfg.retrain.snapshot, directory=True)]
    if cfg.model.weights_dir is not None and not cfg.model.weights_dir.is_dir():
        problems.append(
            f"  - model.weights_dir: directory '{cfg.model.weights_dir}' does not exist; give the "
            "directory that holds <timm name>.safetensors for each backbone, or remove the key"
        )
    return problems


def parse_config(raw: Any, source: str = "<dict>", check_paths: bool = True) -> RunConfig:
    """Validate a raw mapping into a ``RunConfig``.

    ``check_paths=False`` skips the existence checks of data and weights files: for a
    job submitted from a machine where those paths only exist on the cluster.

    Raises:
        ConfigError: With every problem found, each naming its field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    problems = _check_paths(cfg) if check_paths else []
    if problems:
        raise ConfigError(_problems_message(source, problems))
    return _weights_made_absolute(cfg) if check_paths else cfg


def _weights_made_absolute(cfg: RunConfig) -> RunConfig:
    """Local weight paths, checked above against this process's working directory, made
    absolute: trials load them from their own trial directories (Tune's working
    directory), where a relative path finds nothing."""
    model = cfg.model
    absolute = {key: path.absolute() for key in ("weights_file", "weights_dir")
                if (path := getattr(model, key)) is not None and not path.is_absolute()}
    return cfg.model_copy(update={"model": model.model_copy(update=absolute)}) if absolute else cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), check_paths: bool = True) -> RunConfig:
    """Read, override and validate a run file.

    Args:
        path: YAML file.
        overrides: ``section.key=value`` strings applied on top of the file.

    Raises:
        ConfigError: Unreadable YAML or any invalid field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{path}' is a directory; give the run's YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}); give the "
                          "run's YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return parse_config(raw, source=f"'{path}'", check_paths=check_paths)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, written into every run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
