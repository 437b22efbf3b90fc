"""How `osless logs` shows a record to a person: time, source, request, level, then the line.

Never wrapped: a line stays one line, in a terminal (the terminal wraps it, not us) and piped
(rich would otherwise cut lines at 80 columns when stdout is not a terminal).
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text

from osless.cli.output import console, printable

__all__ = ["show"]

_STYLES = {"stderr": "red", "osless": "yellow", "access": "cyan"}
_CONTINUED = "    "  # before each further line of a record (a traceback's)
_LEVEL_STYLES = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red", "DEBUG": "dim"}


def show(rec: dict[str, Any]) -> None:
    text = Text()
    text.append(f"{time.strftime('%H:%M:%S', time.localtime(rec['ts']))} {rec['source']}", style="dim")
    if rec.get("request"):
        text.append(f" {printable(rec['request'])}", style="dim")
    if rec["stream"] == "osless":
        text.append(" [osless]", style="yellow")
    level = rec.get("level")
    if level:
        text.append(f" {level}", style=_LEVEL_STYLES.get(level, ""))
    text.append(" ")
    # The app wrote it: an escape must not reach the terminal, nor a line of it pass for a record.
    text.append(printable(rec["line"], newline=_CONTINUED), style=_STYLES.get(rec["stream"], ""))
    console.print(text, soft_wrap=True, markup=False, highlight=False)
