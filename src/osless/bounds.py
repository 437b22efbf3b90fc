"""Caps on text the platform stores or logs but does not control: errors, names from uploads, log lines.

An upload, an app's output or its traceback can be any size; whatever of it lands in a record, a
log or an answer goes through `cap` (or `quoted` for a name) first.
"""

from __future__ import annotations

__all__ = ["MAX_ERROR_CHARS", "MAX_LINE_CHARS", "MAX_NAME_CHARS", "cap", "quoted"]

MAX_ERROR_CHARS = 4096  # a deploy's `error`, an instance's exit reason or message
MAX_NAME_CHARS = 200  # a name quoted in a message (an archive entry, a key)
MAX_LINE_CHARS = 16384  # one log line


def cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around a note of what was cut.

    Both ends are kept: an error says what failed at its start and how to fix it at its end.
    """
    if len(text) <= limit:
        return text
    note = f" … [{len(text) - limit} characters cut] … "
    room = max(limit - len(note), 0)
    head = room - room // 3
    tail = room - head
    return text[:head] + note + (text[len(text) - tail :] if tail else "")


def quoted(name: str, limit: int = MAX_NAME_CHARS) -> str:
    """`repr(name)`, cut to about `limit` characters with an ellipsis and the full length."""
    shown = repr(name[:limit])
    if len(shown) > limit + 2:  # escapes (\x00, \u2028) take up to 10 characters each
        shown = shown[: limit + 1] + shown[0]
    if len(name) <= limit:
        return shown
    return f"{shown}… ({len(name)} characters)"
