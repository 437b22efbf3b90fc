"""The recent spans of this node's instances, for `osless traces` without a collector.

Each instance writes its finished spans as JSON lines on a pipe of its own (`runtime.tracing`); the
node reads them (`spawn.forward_lines`), checks each (the app writes them: only the known fields, of
the right types and sizes, are kept) and holds the newest `PER_APP` of each app in memory, tagged
with the instance the pipe is of (never what the line says). The node API serves them
(`GET /traces/apps/{app}`); the API asks every node and merges (api/routes/traces.py). They go with
the node's process: this is a window on what just happened, not a store.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from osless.spans import PER_APP, check_span

__all__ = ["SpanStore"]

MAX_APPS = 256  # apps with spans held at once: the one fed least recently goes past it
# Of each app, at most PER_APP spans and PER_APP_BYTES of their lines: an app writing spans at their
# largest (4 KiB) holds 2 MiB of the node's memory, not 8.
PER_APP_BYTES = 2 * 1024 * 1024


class _Held:
    __slots__ = ("bytes", "spans")

    def __init__(self) -> None:
        self.spans: deque[tuple[dict[str, Any], int, float]] = deque()  # (span, its line's size, read at)
        self.bytes = 0


class SpanStore:
    """The newest spans of each app on this node, within PER_APP and PER_APP_BYTES."""

    def __init__(
        self, per_app: int = PER_APP, per_app_bytes: int = PER_APP_BYTES, max_apps: int = MAX_APPS
    ) -> None:
        self.per_app = per_app
        self.per_app_bytes = per_app_bytes
        self.max_apps = max_apps
        self._apps: dict[str, _Held] = {}
        self.dropped = 0  # lines that were not spans

    def add(self, app: str, instance: str, line: str) -> None:
        """One line of an instance's span pipe."""
        span = check_span(line)
        if span is None:
            self.dropped += 1
            return
        span["app"], span["instance"] = app, instance
        held = self._apps.pop(app, None)  # put back last: the dict's order is the apps' recency
        if held is None:
            held = _Held()
            while len(self._apps) >= self.max_apps:
                del self._apps[next(iter(self._apps))]
        held.spans.append((span, len(line), time.time()))
        held.bytes += len(line)
        while len(held.spans) > self.per_app or held.bytes > self.per_app_bytes:
            held.bytes -= held.spans.popleft()[1]
        self._apps[app] = held

    def spans(self, app: str, trace_id: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        """The app's spans (of one trace), those read at `since` or later: by the node's clock, never
        the span's own times, which the app wrote (a deleted app's spans dated ahead would otherwise
        show to a new app of its name)."""
        held = self._apps.get(app)
        if held is None:
            return []
        return [
            s for s, _, at in held.spans if at >= since and (trace_id is None or s["trace_id"] == trace_id)
        ]
