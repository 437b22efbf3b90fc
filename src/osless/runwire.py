"""The wire of a one-off command (`osless run`, a release step), spoken CLI -> API -> node over websockets.

Binary frames carry bytes, their first byte saying whose: `STDIN` (to the command), `STDOUT`,
`STDERR` (from it), at most `MAX_CHUNK` bytes after it. Text frames are JSON objects with an `op`:
- CLI -> API, first: `{"op": "start", "command": [...], "tty": {"rows", "cols"} | null}`; API ->
  node, first: `{"op": "start", "image", "uid", "command", "env", "timeout_s", "tty"}` (the node
  trusts the API alone). With `tty`, the command's stdin, stdout and stderr are a terminal of that
  size (its output all comes as STDOUT), else pipes;
- either way, later: `{"op": "eof"}` (stdin is closed), `{"op": "resize", "rows", "cols"}` (the
  terminal's size), `{"op": "stop"}` (end the command: Ctrl-C without a terminal);
- back, last: `{"op": "exit", "code": N}`, or `{"op": "error", "code", "message"}` (it never ran, or
  the platform lost it), then the socket closes.
Closing the socket ends the command too. Imported by the CLI: stdlib only.
"""

from __future__ import annotations

import shlex

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_ARGS",
    "MAX_CHUNK",
    "MAX_COMMAND_CHARS",
    "MAX_FRAME",
    "MAX_TIMEOUT_S",
    "MAX_TTY",
    "RELEASE_TIMEOUT_S",
    "STDERR",
    "STDIN",
    "STDOUT",
    "TIMEOUT_EXIT",
    "command_problem",
    "shown",
    "tty_size",
]

STDIN, STDOUT, STDERR = 0, 1, 2
MAX_CHUNK = 64 * 1024
# A start message holds the app's config in clear (bounded by the API) besides the command.
MAX_FRAME = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 3600.0  # `osless run`, unless --timeout
RELEASE_TIMEOUT_S = 600.0  # each release command
MAX_TIMEOUT_S = 24 * 3600.0
TIMEOUT_EXIT = 124  # as timeout(1)
MAX_TTY = 10_000  # rows or columns of a terminal
MAX_ARGS = 256
MAX_COMMAND_CHARS = 32 * 1024  # all the arguments together


def command_problem(command: object) -> str | None:
    """What is wrong with a command (a list of arguments), or None."""
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        return "the command must be a non-empty list of arguments, such as ['python', 'manage.py', 'migrate']"
    if not command[0]:
        return "the command's first argument (the program) is empty"
    if len(command) > MAX_ARGS:
        return f"the command has {len(command)} arguments; at most {MAX_ARGS}"
    if sum(len(a) for a in command) > MAX_COMMAND_CHARS:
        return f"the command is longer than {MAX_COMMAND_CHARS} characters"
    if any("\0" in a for a in command):
        return "an argument of the command holds a NUL character"
    return None


def shown(command: list[str], most: int = 500) -> str:
    """The command as a shell would read it, cut at `most` characters (for logs and the audit)."""
    text = shlex.join(command)
    return text if len(text) <= most else text[: most - 3] + "..."


def tty_size(obj: object) -> tuple[int, int] | None:
    """(rows, cols) of a `{"rows", "cols"}` object within bounds, else None (no terminal)."""
    if not isinstance(obj, dict):
        return None
    rows, cols = obj.get("rows"), obj.get("cols")
    if (
        not isinstance(rows, int)
        or not isinstance(cols, int)
        or isinstance(rows, bool)
        or isinstance(cols, bool)
    ):
        return None
    return (rows, cols) if 0 < rows <= MAX_TTY and 0 < cols <= MAX_TTY else None
