"""How the CLI speaks: tables for people, JSON for scripts, one red line and exit 1 on failure."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "JsonOpt",
    "console",
    "err_console",
    "fail",
    "json_mode",
    "json_option",
    "parse_duration",
    "print_json",
    "printable",
    "table",
    "until",
    "usage_failed",
    "when",
]

console = Console(highlight=False)
# What an app (or a node) wrote reaches a person's terminal: its control characters (an escape
# sequence that clears the screen, sets the clipboard, or a newline that starts a made-up line) and
# the bidi overrides that reorder text are shown escaped, never acted on. A tab is kept.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
err_console = Console(stderr=True, highlight=False)
_JSON = "osless.json"  # the context's meta key: --json was given to the command running


def _set_json_mode(ctx: click.Context, value: bool) -> bool:
    if value:
        ctx.meta[_JSON] = True  # meta is shared by the whole command chain, and seen by `fail`
    return value


def json_option(help: str) -> Any:
    """The --json option: it also makes `fail` answer in JSON."""
    # Eager: the mode is known before the other options are checked, so their errors speak JSON too.
    return typer.Option("--json", help=help, callback=_set_json_mode, is_eager=True)


JsonOpt = Annotated[bool, json_option("Machine-readable output.")]


def json_mode() -> bool:
    """Whether the command running was given --json."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and bool(ctx.meta.get(_JSON))


def fail(message: str, code: str = "failed", **detail: Any) -> NoReturn:
    """Say what went wrong and exit 1: under --json, `{"error": {"code", "message", ...}}` on stdout
    (what a script reads); otherwise one red line on stderr."""
    if json_mode():
        # One line: it may end an NDJSON stream (`osless logs --json`) as well as stand alone.
        sys.stdout.write(json.dumps({"error": {"code": code, "message": message, **detail}}) + "\n")
        sys.stdout.flush()
        raise typer.Exit(1)
    # The message may quote user code or build output: never read it as markup.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(1)


def usage_failed(e: click.ClickException) -> NoReturn:
    """A command line click refused (an unknown option, a missing argument, a value of the wrong
    type): as `fail` says an error, with click's exit code (2)."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.meta.get(_JSON):
        sys.stdout.write(
            json.dumps({"error": {"code": "invalid_usage", "message": e.format_message()}}) + "\n"
        )
        sys.stdout.flush()
    else:
        from typer import rich_utils

        rich_utils.rich_format_error(e)  # as typer says it when it runs the command line itself
    raise SystemExit(e.exit_code)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def printable(text: str, newline: str | None = None) -> str:
    """`text` with its control characters escaped (`\\x1b`, `\\n`, `\\u202e`): safe to print; with
    `newline`, each newline kept and followed by it (an indent: a traceback reads as one, yet no
    line it starts can pass for another record)."""
    escaped = _UNPRINTABLE.sub(lambda m: repr(m[0])[1:-1] if newline is None or m[0] != "\n" else "\n", text)
    return escaped if newline is None else escaped.replace("\n", "\n" + newline)


def table(headers: list[str], rows: list[list[Any]]) -> None:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*("" if c is None else printable(str(c)) for c in r))
    console.print(t)


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    ago = time.time() - ts
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= size:
            return f"{int(ago // size)}{unit} ago"
    return f"{int(ago)}s ago"


def until(ts: float | None) -> str:
    """How far in the future `ts` is ("in 29d"), or that it has passed."""
    if not ts:
        return "never"
    left = ts - time.time()
    if left <= 0:
        return f"expired {when(ts)}"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            return f"in {int(left // size)}{unit}"
    return f"in {int(left)}s"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> float:
    """Seconds in "90s", "15m", "12h", "30d", "2w" (or a bare number of seconds); fails with a message."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        fail(f"{option} takes a duration such as 90s, 15m, 12h, 30d or 2w, not {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
