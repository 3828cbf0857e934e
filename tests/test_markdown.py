"""User-named text in the Markdown files tunecv writes (report.md, the export's
README.md, a retrain's gate.md) reads as text: no HTML gets through, no table row
breaks. Each writer's text is built from hand-made inputs, without Ray, training or
an export; markdown-it renders it where it is installed."""

import re

import pytest

from search.config import parse_config
from search.export.bundle import ExportResult, readme_markdown
from search.markdown import md_text
from search.results.report import format_markdown, report_row
from search.results.trials import FAILED, RunView, TrialView
from search.retrain.gate import Score, decide, describe, describe_html, refuse_export
from search.run.trial import trial_config
from search.storage import RunStore
from tests.conftest import small_run_config
from trainables.data.transforms import preprocessing_spec

HOSTILE = "<img src=x onerror=alert(1)>|x"
CONTROLS = "\x1b[31mred\nline\\"  # an ANSI colour, a line break, a trailing backslash
NAMES = [HOSTILE, CONTROLS, "class_0"]


def _html(markdown: str) -> str | None:
    """``markdown`` as a viewer that passes raw HTML through renders it (None without markdown-it)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def _cells(line: str) -> int:
    """A table row's cells, split as GFM does: at each "|" not preceded by a backslash."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def _assert_inert(markdown: str, table_rows: int) -> None:
    """No raw tag, every table keeps its header's column count, the names survive as text."""
    assert "<img" not in markdown and "\x1b" not in markdown
    tables = re.findall(r"(?:^\|.*\n?)+", markdown, flags=re.M)
    rows = [line for table in tables for line in table.splitlines()]
    for table in tables:
        lines = table.splitlines()
        assert {_cells(line) for line in lines} == {_cells(lines[0])}, table
    assert sum("&lt;img" in line for line in rows) == table_rows
    html = _html(markdown)
    if html is not None:
        assert "<img" not in html, html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_md_text_keeps_ordinary_names_and_escapes_the_rest():
    for name in ("class_0", "cat", "7", "efficientnet_b2", "label_smoothing(smoothing=0.1)", "0.8000"):
        assert md_text(name) == name
    assert md_text(HOSTILE) == r"&lt;img src=x onerror=alert(1)&gt;\|x"
    assert md_text(CONTROLS) == "\ufffd\\[31mred line\\\\"
    assert md_text("a&b `c` [d](e) *f*\t\x7f") == r"a&amp;b \`c\` \[d\](e) \*f\* " + "\ufffd"


def test_report_md_escapes_class_names_backbones_reasons_and_the_run_name(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = parse_config(small_run_config(tmp_path / "data", tmp_path))
    epoch = {"epoch": 1, "macro_f1": 0.5, "val_loss": 0.5, "num_params": 10}
    trial = TrialView("t0000", {}, trial_config(cfg.trial().model_dump(mode="json"), {}), FAILED,
                      f"ValueError: bad label {HOSTILE}", (), (epoch,), 1.0)
    row = {**report_row(1, trial), "backbone": HOSTILE}
    m = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    details = {"per_class": {name: m for name in NAMES}, "confusion_matrix": [[1, 1, 0], [0, 1, 1], [1, 0, 1]]}
    test = {"num_images": 6, "macro_f1": 0.5, "macro_f1_interval": {"low": 0.1, "high": 0.9}, **details}
    run = RunView(RunStore.at(tmp_path / "<b>run|x"), cfg, (trial,))
    gate = decide(Score(0.5, dict.fromkeys(NAMES, 0.5), 6, NAMES), None, None, 0.0, 0.1)

    markdown = format_markdown(run, [trial], [row], [(trial, epoch, details)], gate, test)

    assert markdown.startswith(r"# Trial report: &lt;b&gt;run\|x")
    assert r"- `t0000`: ValueError: bad label &lt;img" in markdown
    # The ranked table (backbone), two per-class tables, two confusion matrices (a row
    # and the header each), the gate's table.
    _assert_inert(markdown, table_rows=1 + 2 + 2 * 2 + 1)
    assert "| class_0 | 0.500 |" in markdown and "| **class_0** | 1 | 0 | 1 |" in markdown  # unchanged


def test_export_readme_escapes_the_backbone_and_class_names():
    meta = {"backbone": HOSTILE, "class_names": NAMES,
            "preprocessing": preprocessing_spec(32, "center_crop", (0.5,) * 3, (0.5,) * 3, 0.875)}
    result = ExportResult(None, None, 18, 6, 1e-7, 1.0, 0.5, 0.5, 0.5, None)

    readme = readme_markdown(meta, result)

    assert readme.startswith(r"# &lt;img src=x onerror=alert(1)&gt;\|x image classifier")
    assert "Class order: 0 = &lt;img" in readme and "1 = \ufffd\\[31mred line\\\\, 2 = class_0." in readme
    _assert_inert(readme, table_rows=0)


@pytest.mark.parametrize("champion", [False, True])
def test_gate_md_escapes_class_names_in_reasons_changes_and_the_table(champion):
    # Scored on the new snapshot's classes: the added one too, where the champion gets 0.
    known = [HOSTILE, "class_0", CONTROLS]
    old = Score(0.6, {HOSTILE: 0.9, "class_0": 0.9, "added|<b>": 0.0}, 6, known) if champion else None
    new = Score(0.5, {HOSTILE: 0.1, "class_0": 0.9, "added|<b>": 0.5}, 6, [HOSTILE, "class_0", "added|<b>"])

    decision = decide(new, old, "1" if champion else None, min_gain=0.0, max_class_drop=0.05)
    text = describe(decision)

    if champion:  # the drop reason, the removed and added classes quote names
        assert "for '&lt;img src=x onerror=alert(1)&gt;\\|x' by 0.8000" in text
        assert "- Class '\ufffd\\[31mred line\\\\' removed" in text and r"- Class 'added\|&lt;b&gt;' added" in text
    _assert_inert(text, table_rows=1)
    # The same decision as report.html's section: every name escaped there too.
    page = describe_html(decision)
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;|x" in page and "<b>" not in page
    refused = describe(refuse_export(f"ExportError: checkpoint '/runs/{HOSTILE}' failed", None, 0.0, 0.1))
    assert "'/runs/&lt;img" in refused and "<img" not in refused
