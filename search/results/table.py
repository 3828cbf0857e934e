"""How the ranked table prints: the console's fixed-width text and ``report.md``'s
Markdown table, and each value's format (``report.html`` shows values the same way)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from search.markdown import md_text
from trainables.training.metrics import RANKING_METRIC

_CONSOLE_COLUMNS = (
    ("rank", 4), ("trial_id", 8), ("status", 13), ("backbone", 22), ("unfreeze_depth", 5),
    ("loss", 34), ("lr_head", 9), ("lr_base", 9), (RANKING_METRIC, 8), ("vs_leader", 6), ("val_loss", 8),
    ("epochs_run", 6), ("wall_time_s", 7),
)
_HEADERS = {"unfreeze_depth": "depth", "epochs_run": "epochs", "wall_time_s": "time_s", "vs_leader": "vs_best"}


def format_cell(value: Any, name: str = "") -> str:
    """A report value as the table shows it (console, Markdown, HTML alike)."""
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
        lines += ["| " + " | ".join(md_text(format_cell(r[n], n)) for n in names) + " |" for r in rows]
        return "\n".join(lines)
    cells = [[format_cell(r[n], n) for n in names] for r in rows]
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


def status_summary(trials) -> str:
    """"2 completed, 1 failed, ...": how many trials have each status (the report's headline)."""
    return ", ".join(f"{n} {status}" for status, n in sorted(Counter(t.status for t in trials).items()))
