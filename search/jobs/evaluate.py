"""``tunecv evaluate``: a checkpoint's metrics on a split, on one Ray Train worker or
many, each evaluating a contiguous shard, so any number of workers on any nodes gives
the numbers one process gives. Inputs are read through ``pyarrow.fs`` and checked
before Ray starts; nothing is written into the run they come from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from search.config import ConfigError

# What the CLI's help shows too: a search trial's checkpoint, or `tunecv train`'s best.
CHECKPOINT_EXAMPLE = "RUN/tune/001/t0003/checkpoint_000002 (or RUN/best from tunecv train)"


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str | Path,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    batch_size: int = 64,
    storage: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation images of ``split``.

    Args:
        checkpoint: A checkpoint directory: a local path every node reads, or a URI.
        split: The run's ``split.parquet``, the same way.
        storage: Where Ray Train keeps the evaluation run (a shared path or a URI on a
            multi-node cluster); default: a temporary directory, deleted afterwards.

    Returns:
        The metrics (macro-F1, accuracy, ...), ``world_size`` and the Ray ``nodes`` of
        the ranks.

    Raises:
        ConfigError, trainables.data.layouts.DataError: As :func:`check_evaluation_inputs`,
            before Ray starts.
    """
    check_evaluation_inputs(checkpoint, split)
    from search.ray_session import connect_ray
    from search.run.runners import torch_trainer
    from search.storage import RunStore
    from trainables.config import ScalingConfig
    from trainables.runtime.workers import evaluate_loop_per_worker

    connect_ray()
    temporary = None if storage else tempfile.mkdtemp(prefix="tunecv-evaluate-")
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
    loop_config = {"checkpoint": str(RunStore.at(checkpoint)), "split": str(RunStore.at(split)),
                   "batch_size": batch_size}
    trainer = torch_trainer(evaluate_loop_per_worker, loop_config, scaling, RunStore.at(storage or temporary),
                            f"evaluate-{num_workers}w")
    try:
        return dict(trainer.fit().metrics)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def check_evaluation_inputs(checkpoint: str | Path, split: str | Path) -> None:
    """Refuse what would fail on a Ray worker: a folder that is not a tunecv checkpoint,
    a split file that is missing or unreadable, or a split of other classes.

    Raises:
        ConfigError: The checkpoint or the split file is missing, or they disagree on the
            classes; the message names the path and what to pass instead.
        trainables.data.layouts.DataError: The split file exists but cannot be read.
    """
    from search.storage import RunStore
    from trainables.data.split_files import read_split

    meta = _checkpoint_meta(RunStore.at(checkpoint), str(checkpoint))
    split_store = RunStore.at(split)
    if _file_type(split_store, f"split file '{split}'") != "file":
        raise ConfigError(f"split file '{split}' does not exist; pass the run's own split, RUN/split.parquet.")
    classes = list(read_split(split_store.location).class_names)
    if meta.get("class_names") != classes:
        raise ConfigError(
            f"checkpoint '{checkpoint}' classifies {len(meta.get('class_names', []))} classes "
            f"({_names(meta.get('class_names', []))}), the split '{split}' has {len(classes)} "
            f"({_names(classes)}); pass the split of the checkpoint's own run, RUN/split.parquet."
        )


def _checkpoint_meta(store, given: str) -> dict[str, Any]:
    """The checkpoint's ``meta.json``, after checking that ``store`` holds a checkpoint."""
    from trainables.model.checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE

    kind = _file_type(store, f"checkpoint '{given}'")
    if kind != "directory":
        what = "does not exist" if kind is None else "is a file, not a directory"
        raise ConfigError(f"checkpoint '{given}' {what}; pass a checkpoint directory such as {CHECKPOINT_EXAMPLE}.")
    missing = [name for name in (META_FILE, WEIGHTS_FILE) if not store.exists(name)]
    if missing:
        raise ConfigError(
            f"checkpoint '{given}' is not a tunecv checkpoint: it has no {' and no '.join(missing)}; "
            f"{_checkpoint_hint(store, given)}."
        )
    try:
        meta = store.read_json(META_FILE)
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"checkpoint '{given}': {META_FILE} is not JSON ({err}); the checkpoint is damaged, "
                          "pass another one.") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ConfigError(f"checkpoint '{given}' has format_version {version}, this tunecv reads "
                          f"{FORMAT_VERSION}; evaluate it with the tunecv that wrote it.")
    return meta


def _checkpoint_hint(store, given: str) -> str:
    """What to pass instead: a checkpoint inside ``store`` (a trial's folder), or an example."""
    import pyarrow.fs as pafs

    inside = store.filesystem.get_file_info(pafs.FileSelector(store.fs_path(), allow_not_found=True))
    names = sorted(info.base_name for info in inside
                   if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"))
    if names:
        last = f"{given.rstrip('/')}/{names[-1]}"
        return f"it holds {len(names)} checkpoint(s): pass one of them, e.g. the last, '{last}'"
    return f"pass a checkpoint directory such as {CHECKPOINT_EXAMPLE}"


def _file_type(store, what: str) -> str | None:
    """``"file"``, ``"directory"`` or None (nothing there) at ``store``; ``what`` names it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        kind = store.filesystem.get_file_info(store.fs_path()).type
    except (OSError, pa.ArrowException) as err:  # an unknown scheme, an unreachable bucket
        raise ConfigError(f"cannot open {what}: {err}; check the path or URI.") from err
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(kind)


def _names(names: list[str], shown: int = 4) -> str:
    text = ", ".join(map(str, names[:shown]))
    return text + (", ..." if len(names) > shown else "")
