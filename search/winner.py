"""Exporting a run's winner (or a chosen trial): from the ranked report to ``export/``.

Owns picking the trial (the top-ranked one with a checkpoint, unless one is named) and
handing its best checkpoint and the run's split to ``search/export.py``, which owns the
ONNX conversion and its verification.
"""

from __future__ import annotations

from pathlib import Path

from search.ranking import rank_trials
from search.records import SPLIT_FILE
from search.trial import best_checkpoint_dir

EXPORT_DIR = "export"


class NothingToExportError(ValueError):
    """The run (or the named trial) has no checkpoint to export."""


def export_run(run_dir: Path, trial_id: str | None = None, out_dir: Path | None = None, fetch=None):
    """Export the best checkpoint of ``trial_id`` (default: the top-ranked trial).

    ``fetch(checkpoint_dir)``, when given, brings the chosen checkpoint's weights into
    ``run_dir`` first (object-store runs keep only metadata locally until then).

    Returns:
        The ``ExportResult``.

    Raises:
        NothingToExportError: No trial has a checkpoint, or ``trial_id`` is unknown or has none.
    """
    from search.export import export_checkpoint
    from trainables.datasets import read_split

    run_dir = Path(run_dir)
    ranked = rank_trials(run_dir)
    candidates = [r for r in ranked if r.best_epoch and best_checkpoint_dir(run_dir, r.trial_id).is_dir()]
    if trial_id is not None:
        known = [r.trial_id for r in ranked]
        if trial_id not in known:
            raise NothingToExportError(f"no trial '{trial_id}' in {run_dir}; trials: {', '.join(known)}")
        candidates = [r for r in candidates if r.trial_id == trial_id]
    if not candidates:
        which = f"trial '{trial_id}'" if trial_id else "no trial"
        raise NothingToExportError(f"{which} in {run_dir} has a finished epoch with a checkpoint to export.")
    chosen = candidates[0]
    if fetch is not None:
        fetch(best_checkpoint_dir(run_dir, chosen.trial_id))
    split = read_split(run_dir / SPLIT_FILE)
    return export_checkpoint(
        best_checkpoint_dir(run_dir, chosen.trial_id), split, out_dir or run_dir / EXPORT_DIR
    )


def export_run_at(run, trial_id: str | None = None):
    """``export_run`` for a ``search.storage.RunLocation``: an object-store run fetches
    the chosen weights first and uploads ``export/`` after."""
    result = export_run(
        run.local, trial_id, fetch=lambda checkpoint: run.pull(str(checkpoint.relative_to(run.local)))
    )
    run.push(EXPORT_DIR)
    return result
