"""User-named text made inert in the Markdown files tunecv writes (``report.md``, the
export's ``README.md``, a retrain's ``gate.md``). Class names, file names, run names and
backbone names come from the user's data and config: a class folder named
``<img src=x onerror=alert(1)>`` must read as text in a Markdown viewer, and a name with
``|`` or a newline must not break a table row. tunecv's own fixed text and numbers go
in as they are; this module does not render Markdown, and ``report.html`` escapes for
HTML on its own (``search/results/html.py``).
"""

from __future__ import annotations

_WHITESPACE_CONTROLS = "\t\n\r"
_ESCAPES = {
    # HTML: "<" opens a tag, comment or autolink, "&" an entity; ">" for good measure
    # (a blockquote at a line's start). Entities, not backslashes: they hold in every
    # renderer that passes HTML through, CommonMark or not.
    "&": "&amp;", "<": "&lt;", ">": "&gt;",
    # Markdown: a cell separator, the escape character itself, code spans, links and
    # images ("![...](...)"), emphasis.
    "\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "*": "\\*",
}
# C0 controls, DEL and C1 controls (ESC starts ANSI sequences; 0x9b is a one-byte CSI):
# whitespace ones become a space, so a row stays one line; the rest a visible U+FFFD.
_CONTROLS = {c: (" " if chr(c) in _WHITESPACE_CONTROLS else "\ufffd")
             for c in (*range(0x20), *range(0x7F, 0xA0))}
_TABLE = str.maketrans({**{ord(k): v for k, v in _ESCAPES.items()}, **_CONTROLS})


def md_text(value: object) -> str:
    """``value`` as literal text anywhere in a Markdown line, table cells included.

    Escapes ``&``, ``<`` and ``>`` as entities and ``\\``, ``|``, backtick, ``[``,
    ``]`` and ``*`` with a backslash; tabs and line breaks become spaces and other
    control characters U+FFFD. ``_`` is left alone: it is in most class and backbone
    names (``class_0``, ``efficientnet_b2``), inside a word CommonMark never reads it
    as emphasis, and at a word's edge the worst it does is italics, never HTML or a
    broken row, so ordinary names stay byte for byte what they were. ``~`` (at worst
    strikethrough), ``#`` (a heading only at a line's start, where callers put no
    name) and ``!`` (an image only before ``[``) are left for the same reason.

    Args:
        value: Any value; ``str(value)`` is escaped.

    Returns:
        The escaped text, one line.
    """
    return str(value).translate(_TABLE)
