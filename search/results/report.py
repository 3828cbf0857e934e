"""The ranked trial report: ``report.parquet`` for tools, ``report.md`` and
``report.html`` (plots: ``figures.py``, page: ``html.py``) for people, a table for the
console. The driver that finishes a search writes the files into the run; ``tunecv
report`` builds the same report at any time, mid-run included, and writes it only where
``--out`` says, so the run's files keep one writer.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from search.layout import CONFIG, EXPORT, GATE_JSON, REPORT_HTML, REPORT_MARKDOWN, REPORT_PARQUET, SPLIT, join
from search.markdown import md_text
from search.results.html import PageInputs, render as render_html
from search.results.ranking import rank
from search.results.selection import FINALISTS_NOTE, FinalistGroup, finalist_groups
from search.results.table import format_table, status_summary
from search.results.trials import RunView, TrialView, load_run, read_epoch_details
from search.storage import RunStore
from trainables.training.losses import loss_label
from trainables.training.metrics import PREDICTIONS, RANKING_METRIC

TOP_DETAILED = 3
# Rows that get a validation interval and a vs_leader: the top this many. Each needs its
# trial's kept checkpoint metrics, a read per trial; on an object store at 1,000 trials
# those reads were most of the report, for rows far behind the leader.
TOP_WITH_INTERVALS = 100
LEADER, TIED, BEHIND = "leader", "tied", "behind"  # the vs_leader column
TIED_NOTE = (f"vs_leader `{TIED}`: a paired bootstrap over the validation images cannot tell the trial "
             f"from the leader at 95 %; the ranking among tied trials is noise. Intervals are for the top "
             f"{TOP_WITH_INTERVALS} trials.")


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]  # one per trial, in rank order
    markdown: str
    html: str

    def write_to(self, store: RunStore) -> None:
        """``report.md``, ``report.html`` and, once a trial exists, ``report.parquet``, each written whole."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        store.write_text(REPORT_MARKDOWN, self.markdown)
        store.write_text(REPORT_HTML, self.html)
        if self.rows:
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(self.rows), sink)
            store.write_bytes(REPORT_PARQUET, sink.getvalue())


def report_row(rank_: int, trial: TrialView) -> dict[str, Any]:
    """One trial as a flat row: the columns of the report."""
    cfg, best = trial.config, trial.best_epoch or {}
    return {
        "rank": rank_,
        "trial_id": trial.trial_id,
        "status": trial.status,
        "reason": trial.reason or "",
        "attempts": trial.attempts,
        "backbone": cfg.model.backbone,
        "unfreeze_depth": str(cfg.model.unfreeze_depth),
        "loss": loss_label(cfg.loss),
        "lr_head": cfg.optim.lr_head,
        "lr_base": cfg.optim.lr_base,
        "batch_size": cfg.optim.batch_size,
        "weight_decay": cfg.optim.weight_decay,
        "augment_strength": cfg.augment.strength,
        RANKING_METRIC: best.get(RANKING_METRIC, math.nan),
        "accuracy": best.get("accuracy", math.nan),
        "balanced_accuracy": best.get("balanced_accuracy", math.nan),
        "val_loss": best.get("val_loss", math.nan),
        "best_epoch": best.get("epoch", 0),
        "epochs_run": len(trial.epochs),
        "max_epochs": cfg.optim.epochs,
        "wall_time_s": round(trial.wall_time_s, 2),
        "num_params": trial.num_params or 0,
        "trainable_params": (trial.epochs[-1].get("trainable_params") or 0) if trial.epochs else 0,
        "macro_f1_low": math.nan,  # its bootstrap 95 % interval on the validation split
        "macro_f1_high": math.nan,
        "vs_leader": "",  # leader | tied (the split cannot tell it from the leader) | behind
        "finalist_of": trial.finalist_of or "",  # a finalist repeat: the trial whose configuration it ran again
    }


def build_report(run: RunView) -> Report:
    """Rank the run's trials and render the report (reads each trial's kept checkpoint metrics)."""
    from trainables.data.split_files import read_split

    ranked = rank(run.trials)
    rows = [report_row(i, t) for i, t in enumerate(ranked, start=1)]
    # The first driver writes the split, then space.yaml: a run with a space has its split.
    split = read_split(run.store.uri(SPLIT)) if run.space is not None else None
    details = _details(run.store, [t for t in ranked if t.best_epoch is not None][:TOP_WITH_INTERVALS])
    if split is not None:
        _add_intervals(rows, details, [s.label for s in split.val], len(split.class_names))
    top = [(t, *details[t.trial_id]) for t in ranked if t.trial_id in details][:TOP_DETAILED]
    gate = _gate(run.store)
    test = _export_test(run.store)
    return Report(rows, format_markdown(run, ranked, rows, top, gate, test),
                  render_html(page_inputs(run, ranked, rows, top, gate, split)))


def _details(store: RunStore, trials: list[TrialView]) -> dict[str, tuple[dict, dict]]:
    """Each trial's best epoch and its checkpoint's metrics, read a few at a time: one read
    per trial, and on an object store each is a round trip (1,000 in turn were most of a
    10 s report on S3)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        read = pool.map(lambda t: read_epoch_details(store, t), trials)
        return {t.trial_id: d for t, d in zip(trials, read) if d is not None}


def _add_intervals(rows: list[dict[str, Any]], details: dict[str, tuple[dict, dict]], labels: list[int],
                   num_classes: int) -> None:
    """Each trial's validation interval, and whether the split can tell it from the leader
    (the paired bootstrap interval of their difference holds 0): from the per-image
    predictions its kept checkpoint holds. Checkpoints from before they were kept get none."""
    from search.results.intervals import interval_of, resampled_macro_f1

    predictions = {trial_id: d[PREDICTIONS] for trial_id, (_, d) in details.items()
                   if len(d.get(PREDICTIONS, ())) == len(labels) > 0}
    if not predictions:
        return
    scored = resampled_macro_f1(labels, predictions, num_classes)
    leader = next((r["trial_id"] for r in rows if r["trial_id"] in predictions), None)
    for row in rows:
        if row["trial_id"] not in scored:
            continue
        value, samples = scored[row["trial_id"]]
        interval = interval_of(value, samples)
        row["macro_f1_low"], row["macro_f1_high"] = interval.low, interval.high
        if row["trial_id"] == leader:
            row["vs_leader"] = LEADER
        else:
            leader_value, leader_samples = scored[leader]
            gap = interval_of(leader_value - value, leader_samples - samples)
            row["vs_leader"] = TIED if gap.low <= 0 else BEHIND


def _export_test(store: RunStore) -> dict[str, Any] | None:
    """The export's held-out test score (``export/metrics.json``, "test"), once exported."""
    path = join(EXPORT, "metrics.json")
    return store.read_json(path).get("test") if store.exists(path) else None


def finalists_test(store: RunStore) -> dict[str, dict[str, Any]]:
    """Each finalist configuration's test score (``export/metrics.json``, "finalists"), by
    the trial it came from; empty before the export."""
    path = join(EXPORT, "metrics.json")
    entries = store.read_json(path).get("finalists") or [] if store.exists(path) else []
    return {e["configuration_of"]: e["test"] for e in entries if e.get("test")}


def export_ensemble(store: RunStore) -> dict[str, Any] | None:
    """The finalists' ensemble and its decision (``export/metrics.json``, "ensemble"), once exported."""
    path = join(EXPORT, "metrics.json")
    return store.read_json(path).get("ensemble") if store.exists(path) else None


def ensemble_sentence(ensemble: dict[str, Any] | None) -> str:
    """What averaging the winning configuration's runs gave, and whether it was shipped."""
    if not ensemble:
        return ""
    key = RANKING_METRIC
    verdict = ("shipped: it beats their mean" if ensemble["shipped"]
               else "not shipped: it does not beat their mean, so the best run is exported")
    return (f"Ensemble of the best configuration's runs ({', '.join(ensemble['members'])}, logits averaged): "
            f"validation {key} {ensemble[f'validation_{key}']:.4f} against their mean "
            f"{ensemble[f'members_mean_{key}']:.4f}; {verdict}. "
            + (f"Held-out test {key}: {test_cell(ensemble['test'])}." if ensemble["test"] else "No held-out test split."))


def test_sentence(test: dict[str, Any] | None) -> str:
    """What the exported model scored on the held-out test split, in one sentence."""
    if not test:
        return ("No held-out test score: nothing is exported yet, or the run has no test split "
                "(data.test_fraction: 0).")
    interval = test["macro_f1_interval"]
    return (f"Exported model on {test['num_images']} held-out test images (never seen by the search): "
            f"{RANKING_METRIC} {test[RANKING_METRIC]:.4f}, 95 % interval {interval['low']:.4f}-{interval['high']:.4f}. "
            "Validation chose the model, so its validation numbers are optimistic; this is the one to quote.")


def _gate_html(decision) -> str:
    from search.retrain.gate import describe_html  # onnxruntime's import: only for a retrain's run

    return describe_html(decision)


def _gate_markdown(decision) -> list[str]:
    from search.retrain.gate import describe

    return [describe(decision, level=2)]


def _gate(store: RunStore):
    """A retrain's champion/challenger decision (``gate.Decision``), when the run is a retrain's."""
    if not store.exists(GATE_JSON):
        return None
    from search.retrain.gate import Decision

    return Decision.from_json(store.read_text(GATE_JSON))


def page_inputs(run: RunView, ranked: list[TrialView], rows: list[dict[str, Any]],
                top: list[tuple[TrialView, dict, dict]], gate, split) -> PageInputs:
    """Everything ``report.html`` shows, read from the run; parts not written yet are None."""
    from search.run.scheduler import create_scheduler

    store = run.store
    scheduler = create_scheduler(run.config)  # Ray's own milestones, below the last epoch: where ASHA stops
    rungs = [int(m) for m in scheduler.rungs() if int(m) < run.config.optim.epochs] if scheduler else []
    verification = test = None
    if store.exists(join(EXPORT, "metrics.json")):
        exported = store.read_json(join(EXPORT, "metrics.json"))
        verification, test = exported.get("verification"), exported.get("test")
    return PageInputs(
        run_name=store.name, ranked=ranked, rows=rows, top_details=top, space=run.space, rungs=sorted(rungs),
        split=split, verification=verification, config_text=store.read_text(CONFIG), space_text=run.space_text,
        gate_html=None if gate is None else _gate_html(gate), test=test, test_sentence=test_sentence(test),
        finalists=finalist_groups(ranked), finalists_test=finalists_test(store), ensemble=export_ensemble(store),
    )


def _per_class_markdown(details: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, m in details.get("per_class", {}).items():
        lines.append(f"| {md_text(name)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    names = [md_text(name) for name in details.get("per_class", {})]  # the data's folder names
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, row in zip(names, details.get("confusion_matrix", [])):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def format_markdown(run: RunView, ranked: list[TrialView], rows: list[dict[str, Any]],
                    top: list[tuple[TrialView, dict, dict]], gate,
                    test: dict[str, Any] | None = None) -> str:
    lines = [
        f"# Trial report: {md_text(run.store.name)}",
        "",
        test_sentence(test),
        "",
        # A retrain's run: its champion/challenger decision comes first, where readers look.
        *(_gate_markdown(gate) if gate is not None else []),
        f"{len(ranked)} trials ranked by best validation {RANKING_METRIC} (ties: lower val_loss, then fewer "
        "parameters). " + status_summary(ranked) + ". " + TIED_NOTE,
        "",
        format_table(rows, markdown=True),
        "",
    ]
    if test:
        lines += ["## Exported model on the held-out test split", "", *_per_class_markdown(test), ""]
    lines += finalists_markdown(finalist_groups(ranked), finalists_test(run.store), export_ensemble(run.store))
    failed = [r for r in rows if r["reason"]]
    if failed:
        lines += ["## Failed or stopped trials", ""]
        lines += [f"- `{r['trial_id']}`: {md_text(r['reason'])}" for r in failed] + [""]  # errors quote names
    for trial, epoch, details in top:
        lines += [
            f"## `{trial.trial_id}`: {RANKING_METRIC} {epoch[RANKING_METRIC]:.4f} (epoch {epoch['epoch']})",
            "",
            *_per_class_markdown(details),
            "",
        ]
    return "\n".join(lines)


def finalists_markdown(groups: list[FinalistGroup], tests: dict[str, dict[str, Any]] | None = None,
                       ensemble: dict[str, Any] | None = None) -> list[str]:
    """The finalists' table: each configuration's runs, their mean and spread, and its
    best run's held-out test score (``tests``, by source trial), the winner first; then
    the ensemble of the winner's runs, when the export built one."""
    if not groups:
        return []
    lines = ["## Finalists", "", FINALISTS_NOTE, "",
             f"| configuration of | runs | {RANKING_METRIC} per run | mean | std over seeds | test {RANKING_METRIC} "
             "(best run, 95 % interval) | exported |",
             "|---|---|---|---|---|---|---|"]
    for i, group in enumerate(groups):
        scores = ", ".join(f"{v:.4f}" for v in group.scores) or "-"
        mean = f"{group.mean:.4f}" if group.mean is not None else "-"
        spread = f"{group.spread:.4f}" if group.spread is not None else "-"
        exported = exported_cell(group, i, ensemble)
        lines.append(f"| `{group.source}` | {', '.join(m.trial_id for m in group.members)} | {scores} | {mean} "
                     f"| {spread} | {test_cell((tests or {}).get(group.source))} | {exported} |")
    return lines + [""] + ([ensemble_sentence(ensemble), ""] if ensemble else [])


def exported_cell(group: FinalistGroup, index: int, ensemble: dict[str, Any] | None) -> str:
    """The finalists table's "exported" cell: the winner's best run, or the ensemble of its runs."""
    if index != 0 or group.mean is None:
        return ""
    if ensemble and ensemble["shipped"]:
        return f"yes (ensemble of {', '.join(ensemble['members'])})"
    return f"yes (`{group.best_member().trial_id}`)"


def test_cell(test: dict[str, Any] | None) -> str:
    """A test score with its interval, in one cell ("-" before the export)."""
    if not test:
        return "-"
    interval = test["macro_f1_interval"]
    return f"{test[RANKING_METRIC]:.4f} ({interval['low']:.4f}-{interval['high']:.4f})"


def write_run_report(store: RunStore, print_fn=print) -> Report:
    """The driver's report at the end of a search: written into the run and printed."""
    report = build_report(load_run(store))
    report.write_to(store)
    print_fn(format_table(report.rows))
    print_fn(f"report: {store.uri(REPORT_MARKDOWN)}, {store.uri(REPORT_HTML)}")
    return report

