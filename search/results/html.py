"""``report.html``: one self-contained page (no network request, opens from a file) with
the ranked table, the plots of ``search/results/figures.py``, the top trials' per-class
results, the data summary, the export's verification, and the run's config and space.

Plotly draws the figures. Its plotly.js is 4.8 MB, nearly the whole 5 MB a report may
take, so the page carries it gzip-compressed (1.4 MB, base64) and the browser inflates
it with its own ``DecompressionStream`` before drawing: no CDN, no second file.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import plotly.io as pio

from search.results import figures
from search.results.table import format_cell, status_summary
from search.results.trials import STOPPED_EARLY, TrialView
from trainables.training.metrics import RANKING_METRIC

IMBALANCE_WARN_RATIO = 3.0  # largest / smallest class in training: above it the page warns

_TABLE_COLUMNS = (  # (row key, header)
    ("rank", "rank"), ("trial_id", "trial"), ("status", "status"), ("stop_epoch", "stopped at"),
    (RANKING_METRIC, RANKING_METRIC), ("interval", "95 % interval"), ("vs_leader", "vs leader"),
    ("val_loss", "val_loss"), ("backbone", "backbone"),
    ("unfreeze_depth", "depth"), ("loss", "loss"), ("lr_head", "lr_head"), ("lr_base", "lr_base"),
    ("batch_size", "batch"), ("epochs_run", "epochs"), ("wall_time_s", "time_s"), ("reason", "reason"),
)


@dataclass(frozen=True)
class PageInputs:
    """What the page shows beyond the ranked trials; each part may be missing mid-run."""

    run_name: str
    ranked: list[TrialView]
    rows: list[dict[str, Any]]
    top_details: list[tuple[TrialView, dict[str, Any], dict[str, Any]]]  # (trial, best epoch, metrics.json)
    space: Any  # SearchSpace, or None before the first driver wrote space.yaml
    rungs: list[int]  # the epochs where ASHA may stop a trial
    split: Any  # DataSplit, or None
    verification: dict[str, Any] | None  # export/metrics.json's "verification"
    config_text: str
    space_text: str
    gate_html: str | None  # a retrain's gate decision (search.retrain.gate.describe_html)
    test: dict[str, Any] | None = None  # export/metrics.json's "test": the held-out score
    test_sentence: str = ""
    finalists: list = field(default_factory=list)  # FinalistGroup, best mean first (search/results/selection.py)
    finalists_test: dict = field(default_factory=dict)  # source trial -> its best run's test score, once exported
    ensemble: dict | None = None  # export/metrics.json's "ensemble": the winner's runs averaged, once exported


@lru_cache(maxsize=1)
def _plotly_js_gzip_b64() -> str:
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), mtime=0)).decode("ascii")


def render(page: PageInputs) -> str:
    """The whole page as one string."""
    sections: list[str] = []
    figs: list[tuple[str, Any]] = []

    def plot(fig, note: str = "") -> str:
        if fig is None:
            return ""
        fig_id = f"fig{len(figs)}"
        figs.append((fig_id, fig))
        return f'<div class="plot" id="{fig_id}"></div>' + (f"<p class=note>{_e(note)}</p>" if note else "")

    summary = status_summary(page.ranked) or "no trials yet"
    sections.append(f"<h1>Trial report: {_e(page.run_name)}</h1>"
                    f'<p id="test-score"><strong>{_e(page.test_sentence)}</strong></p>'
                    f"<p>{len(page.ranked)} trials ranked by best validation "
                    f"{RANKING_METRIC} (ties: lower val_loss, then fewer parameters): {_e(summary)}.</p>")
    if page.gate_html:  # a retrain's decision, at the top where readers look
        sections.append(page.gate_html)
    sections.append("<h2>Trials</h2><p class=note>Click a column header to sort. The interval is a bootstrap 95 % "
                    "interval over the validation images; <em>tied</em>: a paired bootstrap cannot tell the trial "
                    "from the leader, so their order is noise.</p>" + _table(page.rows))
    if page.test:
        sections.append("<h2>Exported model on the held-out test split</h2><div class=pair>"
                        + plot(figures.confusion_matrix(page.test, "test: confusion matrix"))
                        + plot(figures.per_class_bars(page.test, "test: precision, recall, F1"))
                        + "</div>")

    if page.finalists:
        sections.append(_finalists_section(page.finalists, page.finalists_test, page.ensemble))

    sections.append("<h2>Search</h2>")
    sections.append(plot(figures.optimisation_history(page.ranked)))
    sections.append(plot(figures.learning_curves(page.ranked, page.rungs)))
    if page.space is not None:
        study = figures.parameter_study(page.ranked, page.space)
        sections.append(plot(figures.parallel_coordinates(study)))
        fig, note = figures.importances(study)
        sections.append(plot(fig, note) if fig is not None else f'<p class="note" id="importance-note">{_e(note)}</p>')

    if page.top_details:
        sections.append("<h2>Top trials, per class</h2>")
    for trial, epoch, details in page.top_details:
        head = f"{trial.trial_id}: {RANKING_METRIC} {epoch[RANKING_METRIC]:.4f} (epoch {epoch['epoch']})"
        sections.append(f"<h3>{_e(head)}</h3><div class=pair>"
                        + plot(figures.confusion_matrix(details, f"{trial.trial_id}: confusion matrix"))
                        + plot(figures.per_class_bars(details, f"{trial.trial_id}: precision, recall, F1"))
                        + "</div>")

    sections.append(_data_section(page.split))
    sections.append(_export_section(page.verification))
    sections.append(f"<h2>Run config</h2><pre>{_e(page.config_text)}</pre>")
    sections.append(f"<h2>Search space</h2><pre>{_e(page.space_text or '(not written yet)')}</pre>")

    specs = "\n".join(
        f'<script type="application/json" id="{fig_id}-spec">{_script_safe(pio.to_json(fig, validate=False))}</script>'
        for fig_id, fig in figs
    )
    return _PAGE.format(
        title=_e(f"tunecv report: {page.run_name}"), css=_CSS, body="\n".join(s for s in sections if s),
        specs=specs, plotly_gz=_plotly_js_gzip_b64() if figs else "", ids=json.dumps([fig_id for fig_id, _ in figs]),
    )


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No trial has started yet.</p>"
    head = "".join(f'<th data-col="{i}">{_e(h)}</th>' for i, (_, h) in enumerate(_TABLE_COLUMNS))
    body = []
    for row in rows:
        row = {**row, "stop_epoch": row["epochs_run"] if row["status"] == STOPPED_EARLY else "",
               "interval": "" if row["macro_f1_low"] != row["macro_f1_low"]  # NaN: no predictions kept
               else f"{row['macro_f1_low']:.3f}-{row['macro_f1_high']:.3f}"}
        cells = "".join(f'<td data-v="{_e(_sort_key(row[key]))}">{_e(_cell(row[key], key))}</td>'
                        for key, _ in _TABLE_COLUMNS)
        body.append(f'<tr class="{_e(row["status"])}">{cells}</tr>')
    return (f'<div class="wide"><table id="trials" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _cell(value: Any, name: str) -> str:
    return "" if value == "" else format_cell(value, name)


def _sort_key(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value)) if value == value else ""  # NaN sorts as empty
    return str(value)


def _finalists_section(groups, tests: dict, ensemble: dict | None) -> str:
    from search.results.report import ensemble_sentence, exported_cell, test_cell
    from search.results.selection import FINALISTS_NOTE

    head = "".join(f"<th>{_e(h)}</th>" for h in (
        "configuration of", "runs", f"{RANKING_METRIC} per run", "mean", "std over seeds",
        f"test {RANKING_METRIC} (best run, 95 % interval)", "exported"))
    body = []
    for i, group in enumerate(groups):
        exported = exported_cell(group, i, ensemble).replace("`", "")
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            group.source, ", ".join(m.trial_id for m in group.members),
            ", ".join(f"{v:.4f}" for v in group.scores) or "-",
            "-" if group.mean is None else f"{group.mean:.4f}",
            "-" if group.spread is None else f"{group.spread:.4f}", test_cell(tests.get(group.source)),
            exported)) + "</tr>")
    return (f'<h2>Finalists</h2><p class=note>{_e(FINALISTS_NOTE)}</p>'
            f'<table id="finalists"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<p id="ensemble">{_e(ensemble_sentence(ensemble))}</p>' if ensemble else ""))


def _data_section(split) -> str:
    if split is None:
        return "<h2>Data</h2><p>The data has not been scanned yet.</p>"
    train, val, test = (split.class_counts(name) for name in ("train", "val", "test"))
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{t}</td><td>{v}</td><td>{n}</td></tr>"
                   for name, t, v, n in zip(split.class_names, train, val, test))
    warnings = []
    if split.duplicates_across_splits:
        warnings.append(f"{len(split.duplicates_across_splits)} held-out image(s) also appear in an earlier split "
                        "(same content): their scores are optimistic.")
    smallest, largest = min(train), max(train)
    if smallest == 0 or largest / smallest > IMBALANCE_WARN_RATIO:
        ratio = "a class has no training image" if smallest == 0 else f"{largest / smallest:.1f}:1"
        warnings.append(f"Imbalanced training set ({ratio} between the largest and smallest class): macro-F1 "
                        "weighs every class equally, and class-weighted or focal losses may help.")
    out = [f"<h2>Data</h2><p>{len(split.train)} training, {len(split.val)} validation and {len(split.test)} "
           f"held-out test images, {len(split.class_names)} classes, fingerprint "
           f"<code>{_e(split.fingerprint()[:12])}</code>.</p>",
           '<table id="classes"><thead><tr><th>class</th><th>train</th><th>val</th><th>test</th></tr></thead>'
           f"<tbody>{rows}</tbody></table>"]
    out += [f'<p class="warning">{_e(w)}</p>' for w in warnings]
    if split.bad_files:
        items = "".join(f"<li><code>{_e(b.path)}</code>: {_e(b.reason)}</li>" for b in split.bad_files[:200])
        more = f"<li>... and {len(split.bad_files) - 200} more (split.json)</li>" if len(split.bad_files) > 200 else ""
        out.append(f"<h3>Skipped files ({len(split.bad_files)})</h3><ul>{items}{more}</ul>")
    return "".join(out)


def _export_section(verification: dict[str, Any] | None) -> str:
    if verification is None:
        return "<h2>Export</h2><p>Nothing exported yet (the search exports its winner when it finishes).</p>"
    onnx = verification.get("onnx", {})
    items = [
        ("images verified", verification.get("num_images")),
        ("max |logit difference| ONNX vs PyTorch", f"{verification.get('max_abs_logit_diff', float('nan')):.2e}"),
        ("argmax agreement", f"{verification.get('argmax_agreement', float('nan')):.4f}"),
        (f"ONNX {RANKING_METRIC} (recomputed)", f"{onnx.get(RANKING_METRIC, float('nan')):.4f}"),
        (f"PyTorch {RANKING_METRIC} (recomputed)", f"{verification.get('eager_macro_f1', float('nan')):.4f}"),
        (f"{RANKING_METRIC} the trial reported", f"{verification.get('reported_macro_f1', float('nan')):.4f}"),
        ("opset, exporter", f"{verification.get('opset')}, {verification.get('exporter')}"),
    ]
    int8 = verification.get("int8")
    if int8:
        items.append(("int8", f"shipped: {RANKING_METRIC} {int8['macro_f1']:.4f}" if int8.get("shipped")
                      else f"not shipped: {int8.get('refused')}"))
    if verification.get("tensorrt"):
        items.append(("TensorRT", json.dumps(verification["tensorrt"])))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in items)
    return f'<h2>Export</h2><table id="export">{rows}</table>'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _script_safe(text: str) -> str:
    """JSON inside a <script> element: no "<" at all, so no label ("</script>",
    "<!--") can end or change the element, whatever plotly's own escaping."""
    return text.replace("<", "\\u003c")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; }
#trials th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
#trials td { white-space: nowrap; } #trials td:last-child { white-space: normal; min-width: 18em; }
.wide { overflow-x: auto; }
tr.failed td { color: #a33; } tr.stopped_early td { color: #666; } tr.running td { color: #246; }
.plot { width: 100%; min-height: 300px; } .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.note { color: #555; font-size: 13px; } .warning { color: #8a4b00; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
#status { color: #a33; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body>
<p id="status"></p>
{body}
{specs}
<script type="application/octet-stream" id="plotly-gz">{plotly_gz}</script>
<script>
// The ranked table sorts on a header click (numbers as numbers, blanks last).
document.querySelectorAll("table.sortable th").forEach(th => th.addEventListener("click", () => {{
  const table = th.closest("table"), col = +th.dataset.col, body = table.tBodies[0];
  const up = th.dataset.dir !== "asc"; th.dataset.dir = up ? "asc" : "desc";
  const key = tr => tr.children[col].dataset.v;
  const rows = [...body.rows].sort((a, b) => {{
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const nx = parseFloat(x), ny = parseFloat(y);
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return up ? c : -c;
  }});
  rows.forEach(r => body.appendChild(r));
}}));
// plotly.js travels gzip-compressed in this page; the browser inflates it, then draws.
(async () => {{
  const ids = {ids};
  if (!ids.length) {{ document.body.dataset.plotted = "0"; return; }}
  try {{
    const bytes = Uint8Array.from(atob(document.getElementById("plotly-gz").textContent), c => c.charCodeAt(0));
    const code = await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
    const script = document.createElement("script");
    script.textContent = code;
    document.head.appendChild(script);
    for (const id of ids) {{
      const spec = JSON.parse(document.getElementById(id + "-spec").textContent);
      await Plotly.newPlot(id, spec.data, spec.layout, {{displaylogo: false, responsive: true}});
    }}
    document.body.dataset.plotted = String(ids.length);
  }} catch (err) {{
    document.getElementById("status").textContent = "The plots could not be drawn in this browser: " + err;
    throw err;
  }}
}})();
</script>
</body></html>
"""
