"""Exporting the winner (or a named trial): the first trial in the selection order
(``search/results/selection.py``) whose best checkpoint Ray still keeps, its weights and metadata fetched alone, handed with the run's split to
``search/export/onnx.py``; or the ensemble of the winner's runs
(``search/export/ensemble.py``). The finishing driver exports into ``export/``; ``tunecv
export`` writes where ``--out`` says.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from search.layout import EXPORT, SPLIT, join
from search.results.selection import finalist_groups, selection_order, selection_rule
from search.results.trials import load_run
from search.storage import RunStore
from trainables.model.checkpoint import META_FILE, WEIGHTS_FILE
from trainables.training.metrics import RANKING_METRIC


class NothingToExportError(ValueError):
    """The run (or the named trial) has no checkpoint to export."""


def best_checkpoint(store: RunStore, trial_id: str | None = None, trials=None) -> tuple[str, str]:
    """(trial id, checkpoint relative to the run) of ``trial_id``, or else of the winner:
    the top-ranked trial, or the best run of the best finalist (``search/results/selection.py``)."""
    ranked = selection_order(load_run(store).trials if trials is None else trials)
    if trial_id is not None:
        known = [t.trial_id for t in ranked]
        if trial_id not in known:
            raise NothingToExportError(f"no trial '{trial_id}' in {store}; trials: {', '.join(known)}")
        ranked = [t for t in ranked if t.trial_id == trial_id]
    for trial in ranked:
        for rel in trial.checkpoints_by_rank():
            if store.exists(join(rel, WEIGHTS_FILE)):
                return trial.trial_id, rel
    which = f"trial '{trial_id}'" if trial_id else "no trial"
    raise NothingToExportError(f"{which} in {store} has a finished epoch with a checkpoint to export.")


def export_trial(store: RunStore, out_dir: Path, trial_id: str | None = None, int8=None):
    """Export the best checkpoint of ``trial_id`` (default: the winner, or the finalists'
    ensemble when the run's config asks for it and its rule ships it) to ``out_dir``, with
    a gated static int8 model when ``int8`` (an ``Int8Config``) is given.

    Returns:
        The ``ExportResult``.

    Raises:
        NothingToExportError: No trial has a checkpoint, or ``trial_id`` is unknown or has none.
    """
    from search.export.ensemble import winning_ensemble
    from search.export.onnx import export_checkpoint, export_model
    from search.export.scoring import model_test_report
    from trainables.data.split_files import read_split

    run = load_run(store)
    trials = run.trials
    chosen, rel = best_checkpoint(store, trial_id, trials)
    split = read_split(store.uri(SPLIT))
    annotations = {"source": {"trial_id": chosen, "checkpoint": rel,
                              "chosen_by": "asked for" if trial_id else selection_rule(trials)}}
    if trial_id is None and finalist_groups(trials):
        annotations["finalists"] = finalists_on_test(store, trials, split)
        ensemble = winning_ensemble(store, trials, split) if run.config.search.finalists.ensemble else None
        if ensemble is not None:  # its test score beside the winner's, shipped or not (PyTorch)
            annotations["ensemble"] = ensemble.summary(model_test_report(ensemble.model, ensemble.meta, split))
        if ensemble is not None and ensemble.shipped:
            annotations["source"] = {"trial_id": chosen, "members": list(ensemble.members),
                                     "chosen_by": ensemble_rule(ensemble)}
            return export_model(ensemble.model, ensemble.meta, split, out_dir, int8=int8, annotations=annotations)
    with store.local_files(rel, (WEIGHTS_FILE, META_FILE)) as checkpoint:
        return export_checkpoint(checkpoint, split, out_dir, int8=int8, annotations=annotations)


def ensemble_rule(ensemble) -> str:
    """Why the ensemble is exported, in a few words."""
    return (f"ensemble of the best finalist's {len(ensemble.members)} runs ({', '.join(ensemble.members)}): "
            f"validation {RANKING_METRIC} {ensemble.macro_f1:.4f} against their mean {ensemble.members_mean:.4f}")


def finalists_on_test(store: RunStore, trials, split) -> list[dict]:
    """Each finalist configuration's best run scored on the held-out test split (best
    mean first): what choosing another finalist would have shipped. Reported only;
    nothing chooses on it."""
    from search.export.scoring import checkpoint_test_report

    scores = []
    for group in finalist_groups(trials):
        member = group.best_member()
        rel = next((r for r in member.checkpoints_by_rank() if store.exists(join(r, WEIGHTS_FILE))), None)
        test = None
        if rel is not None:
            with store.local_files(rel, (WEIGHTS_FILE, META_FILE)) as checkpoint:
                test = checkpoint_test_report(checkpoint, split)
        scores.append({"configuration_of": group.source, "runs": [m.trial_id for m in group.members],
                       "validation_mean": group.mean, "validation_scores": list(group.scores),
                       "trial_id": member.trial_id, "checkpoint": rel, "test": test})
    return scores


def export_winner(store: RunStore, print_fn=print, int8=None):
    """The driver's export at the end of a search, into the run's ``export/`` (each file whole)."""
    with tempfile.TemporaryDirectory(prefix="tunecv-export-") as tmp:
        result = export_trial(store, Path(tmp) / EXPORT, int8=int8)
        store.upload_dir(Path(tmp) / EXPORT, EXPORT)
    print_fn(
        f"exported {store.uri(EXPORT)} (trial {result.annotations['source']['trial_id']}, "
        f"{result.annotations['source']['chosen_by']}): ONNX macro-F1 {result.onnx_macro_f1:.4f} (reported "
        f"{result.reported_macro_f1:.4f}), argmax agreement {result.argmax_agreement:.4f}, "
        f"max |logit diff| {result.max_abs_logit_diff:.2e}"
    )
    ensemble = result.annotations.get("ensemble")
    if ensemble and not ensemble["shipped"]:
        print_fn(f"ensemble of {', '.join(ensemble['members'])} not shipped: validation {RANKING_METRIC} "
                 f"{ensemble[f'validation_{RANKING_METRIC}']:.4f}, no better than their mean "
                 f"{ensemble[f'members_mean_{RANKING_METRIC}']:.4f}")
    if result.test:
        interval = result.test["macro_f1_interval"]
        print_fn(f"held-out test: macro-F1 {result.test['macro_f1']:.4f} on {result.test['num_images']} images "
                 f"(95 % interval {interval['low']:.4f}-{interval['high']:.4f}); the search never saw them")
    if result.int8:
        print_fn(describe_int8(result.int8))
    return result


def describe_int8(check: dict) -> str:
    """One line on the int8 model: shipped with its numbers, or why not."""
    if not check.get("shipped"):
        return f"int8: not shipped: {check['refused']}"
    line = (f"int8: {check['file']}: macro-F1 {check['macro_f1']:.4f} vs fp32 {check['fp32_macro_f1']:.4f} "
            f"({check['macro_f1_drop_points']:+.2f} points lost, max {check['max_drop_points']:g}), argmax "
            f"agreement {check['argmax_agreement']:.4f}")
    return line + (f"; {check['speed_note']}" if check.get("speed_note") else "")
