"""The terminal, kept out of reach of user-named text. Class folders, file names, run
names and config values reach the console in tunecv's lines, its warnings and errors,
and the trial output Ray forwards; a class folder named ``\\x1b]0;owned\\x07`` would
retitle the terminal, and ``\\x1b[2J`` clear it. While a ``tunecv`` command runs,
``sys.stdout`` and ``sys.stderr`` write through :class:`ConsoleStream`, which shows every
control character as its Python escape (``\\x1b``) and lets through only what a console
line needs: tab, newline, carriage return, and colour (SGR, ``ESC [ ... m``), which
Ray's own log prefixes use and which can change nothing but colour. A traceback, which
Python prints after the command's streams are restored, goes through
:func:`escaped_excepthook`.
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from typing import Iterator, TextIO

_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def console_text(text: str) -> str:
    """``text`` with every control character but tab, newline, carriage return and SGR
    colour sequences written as its escape (ESC as ``\\x1b``)."""
    if not _CONTROL.search(text):
        return text
    out, end = [], 0
    for colour in _SGR.finditer(text):
        out += [_escaped(text[end:colour.start()]), colour.group()]
        end = colour.end()
    out.append(_escaped(text[end:]))
    return "".join(out)


def _escaped(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ConsoleStream:
    """A text stream that writes ``console_text`` of what it is given to ``inner``; all
    else (``fileno``, ``isatty``, ``encoding``, ``buffer``) is ``inner``'s."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(console_text(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@contextlib.contextmanager
def escaped_console() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` through :class:`ConsoleStream` for the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ConsoleStream(sys.stdout), ConsoleStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def escaped_excepthook(kind, value, tb) -> None:
    """``sys.excepthook``: the traceback Python would print, through :func:`console_text`."""
    sys.stderr.write(console_text("".join(traceback.format_exception(kind, value, tb))))
