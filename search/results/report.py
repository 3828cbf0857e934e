"""The ranked trial report: ``report.parquet`` for tools, ``report.md`` for people, a
table for the console. The driver that finishes a search writes the files into the
run; ``tunecv report`` builds the same report at any time and writes it only where
``--out`` says, so the run's files keep one writer.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from search.layout import GATE_JSON, REPORT_MARKDOWN, REPORT_PARQUET
from search.results.ranking import rank
from search.results.trials import RunView, TrialView, load_run, read_epoch_details
from search.storage import RunStore
from trainables.losses import loss_label
from trainables.metrics import RANKING_METRIC

TOP_DETAILED = 3


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]  # one per trial, in rank order
    markdown: str

    def write_to(self, store: RunStore) -> None:
        """``report.md`` and, once a trial exists, ``report.parquet``, each written whole."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        store.write_text(REPORT_MARKDOWN, self.markdown)
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
    }


def build_report(run: RunView) -> Report:
    """Rank the run's trials and render the report (reads the top trials' per-class metrics)."""
    ranked = rank(run.trials)
    rows = [report_row(i, t) for i, t in enumerate(ranked, start=1)]
    return Report(rows, format_markdown(run, ranked, rows))


_CONSOLE_COLUMNS = (
    ("rank", 4), ("trial_id", 8), ("status", 13), ("backbone", 22), ("unfreeze_depth", 5),
    ("loss", 34), ("lr_head", 9), ("lr_base", 9), (RANKING_METRIC, 8), ("val_loss", 8),
    ("epochs_run", 6), ("wall_time_s", 7),
)
_HEADERS = {"unfreeze_depth": "depth", "epochs_run": "epochs", "wall_time_s": "time_s"}


def _cell(value: Any, name: str = "") -> str:
    if name == "wall_time_s":
        return f"{value:.1f}"  # seconds: one decimal whatever the size
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if 0 < abs(value) < 1e-2:
            return f"{value:.2e}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The ranked table, as fixed-width text or as a Markdown table."""
    names = [name for name, _ in _CONSOLE_COLUMNS]
    headers = [_HEADERS.get(n, n) for n in names]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(_cell(r[n], n) for n in names) + " |" for r in rows]
        return "\n".join(lines)
    cells = [[_cell(r[n], n) for n in names] for r in rows]
    # Each column as wide as its widest cell: a cut label ("vit_base_patch16_22",
    # "label_smoothing(smoo") reads as another value.
    widths = [max(w, len(h), *(len(row[i]) for row in cells)) for i, ((_, w), h)
              in enumerate(zip(_CONSOLE_COLUMNS, headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for r, row in zip(rows, cells):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if r["reason"]:
            lines.append(f"      reason: {r['reason']}")
    return "\n".join(lines)


def _per_class_markdown(details: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, m in details.get("per_class", {}).items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    names = list(details.get("per_class", {}))
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, row in zip(names, details.get("confusion_matrix", [])):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def format_markdown(run: RunView, ranked: list[TrialView], rows: list[dict[str, Any]]) -> str:
    counts = Counter(t.status for t in ranked)
    lines = [
        f"# Trial report: {run.store.name}",
        "",
        f"{len(ranked)} trials ranked by best {RANKING_METRIC} (ties: lower val_loss, then fewer "
        "parameters). " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        format_table(rows, markdown=True),
        "",
    ]
    failed = [r for r in rows if r["reason"]]
    if failed:
        lines += ["## Failed or stopped trials", ""] + [f"- `{r['trial_id']}`: {r['reason']}" for r in failed] + [""]
    detailed = 0
    for trial in ranked:
        if detailed == TOP_DETAILED or trial.best_epoch is None:
            break
        found = read_epoch_details(run.store, trial)
        if found is None:
            continue  # no checkpoint of it is left to read (its run was cut short)
        epoch, details = found
        detailed += 1
        lines += [
            f"## `{trial.trial_id}`: {RANKING_METRIC} {epoch[RANKING_METRIC]:.4f} (epoch {epoch['epoch']})",
            "",
            *_per_class_markdown(details),
            "",
        ]
    if run.store.exists(GATE_JSON):  # a retrain's run: its champion/challenger decision
        from search.retrain.gate import Decision, describe

        lines += [describe(Decision.from_json(run.store.read_text(GATE_JSON)), level=2)]
    return "\n".join(lines)


def write_run_report(store: RunStore, print_fn=print) -> Report:
    """The driver's report at the end of a search: written into the run and printed."""
    report = build_report(load_run(store))
    report.write_to(store)
    print_fn(format_table(report.rows))
    print_fn(f"report: {store.uri(REPORT_MARKDOWN)}")
    return report

