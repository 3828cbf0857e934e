"""The ranked trial report: Parquet for tools, Markdown for people, a table for the console.

Owns turning ranked ``TrialSummary`` rows into report files in the run directory
(``report.parquet``, ``report.md``) and the table printed at the end of a run. It can
be rebuilt from disk at any time (``tunecv report RUN_DIR``), also while the search is
running or after it was interrupted. Every trial is listed: completed, stopped early
by ASHA, failed (with its reason), interrupted.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from search.ranking import TrialSummary, rank_trials
from search.records import CONFIG_FILE, TRIALS_DIR
from search.trial import deep_merge
from trainables.metrics import RANKING_METRIC

REPORT_PARQUET = "report.parquet"
REPORT_MARKDOWN = "report.md"
TOP_DETAILED = 3


def _base_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _loss_label(loss: dict[str, Any]) -> str:
    kind = loss.get("type", "?")
    if kind == "label_smoothing":
        return f"label_smoothing({loss.get('smoothing', 0):.3g})"
    if kind == "focal":
        return f"focal(gamma={loss.get('gamma', 0):.3g})"
    return kind


def report_rows(run_dir: Path, ranked: list[TrialSummary]) -> list[dict[str, Any]]:
    """One flat dict per trial, in rank order: the columns of the report."""
    rows = []
    base = _base_config(run_dir)  # the run's fixed settings; each trial overrides some
    for rank, row in enumerate(ranked, start=1):
        cfg = deep_merge(base, row.record.overrides)
        best = row.best_epoch or {}
        rows.append({
            "rank": rank,
            "trial_id": row.trial_id,
            "status": row.status,
            "reason": row.record.reason or "",
            "backbone": cfg.get("model", {}).get("backbone"),
            "unfreeze_depth": str(cfg.get("model", {}).get("unfreeze_depth")),
            "loss": _loss_label(cfg.get("loss", {})),
            "lr_head": cfg.get("optim", {}).get("lr_head"),
            "lr_base": cfg.get("optim", {}).get("lr_base"),
            "batch_size": cfg.get("optim", {}).get("batch_size"),
            "weight_decay": cfg.get("optim", {}).get("weight_decay"),
            "augment_strength": cfg.get("augment", {}).get("strength"),
            RANKING_METRIC: best.get(RANKING_METRIC, math.nan),
            "accuracy": best.get("accuracy", math.nan),
            "balanced_accuracy": best.get("balanced_accuracy", math.nan),
            "val_loss": best.get("val_loss", math.nan),
            "best_epoch": best.get("epoch", 0),
            "epochs_run": row.epochs_run,
            "max_epochs": row.record.max_epochs,
            "wall_time_s": round(row.wall_time_s, 2),
            "num_params": row.num_params or 0,
            "trainable_params": row.trainable_params or 0,
        })
    return rows


def write_report(run_dir: Path) -> tuple[list[TrialSummary], list[dict[str, Any]]]:
    """Rank the run's trials and (re)write ``report.parquet`` and ``report.md``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    ranked = rank_trials(run_dir)
    rows = report_rows(run_dir, ranked)
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), run_dir / REPORT_PARQUET)
    (run_dir / REPORT_MARKDOWN).write_text(format_markdown(run_dir, ranked, rows))
    return ranked, rows


_CONSOLE_COLUMNS = (
    ("rank", 4), ("trial_id", 16), ("status", 13), ("backbone", 22), ("unfreeze_depth", 5),
    ("loss", 22), ("lr_head", 9), ("lr_base", 9), (RANKING_METRIC, 8), ("val_loss", 8),
    ("epochs_run", 6), ("wall_time_s", 7),
)
_HEADERS = {"unfreeze_depth": "depth", "epochs_run": "epochs", "wall_time_s": "time_s"}


def _cell(value: Any) -> str:
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
        lines += ["| " + " | ".join(_cell(r[n]) for n in names) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(w, len(h)) for (_, w), h in zip(_CONSOLE_COLUMNS, headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for r in rows:
        lines.append("  ".join(_cell(r[n])[:w].ljust(w) for n, w in zip(names, widths)))
        if r["reason"]:
            lines.append(f"      reason: {r['reason']}")
    return "\n".join(lines)


def _per_class_markdown(best: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, m in best.get("per_class", {}).items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    names = list(best.get("per_class", {}))
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, row in zip(names, best.get("confusion_matrix", [])):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def format_markdown(run_dir: Path, ranked: list[TrialSummary], rows: list[dict[str, Any]]) -> str:
    counts = Counter(r.status for r in ranked)
    lines = [
        f"# Trial report: {run_dir.name}",
        "",
        f"{len(ranked)} trials ranked by best {RANKING_METRIC} (ties: lower val_loss, then fewer "
        "parameters). " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        format_table(rows, markdown=True),
        "",
    ]
    failed = [r for r in rows if r["reason"]]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{r['trial_id']}`: {r['reason']}" for r in failed] + [""]
    for row in [r for r in ranked if r.best_epoch][:TOP_DETAILED]:
        lines += [
            f"## `{row.trial_id}`: {RANKING_METRIC} {row.macro_f1:.4f} (epoch {row.best_epoch['epoch']})",
            "",
            *_per_class_markdown(row.best_epoch),
            "",
        ]
    return "\n".join(lines)


def write_run_report(run, print_fn=print) -> None:
    """Rank every trial of ``run`` (a ``search.storage.RunLocation``) and print the table.

    Object-store runs fetch the records first (not the weights) and upload the report.
    """
    run.pull(TRIALS_DIR, metadata_only=True)
    _, rows = write_report(run.local)
    run.push(REPORT_PARQUET, REPORT_MARKDOWN)
    print_fn(format_table(rows))
    print_fn(f"report: {run.uri + '/' + REPORT_MARKDOWN if run.uri else run.local / REPORT_MARKDOWN}")
