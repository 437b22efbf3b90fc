"""The recent spans of this node's instances, for `osless traces` without a collector.

Each instance writes its finished spans as JSON lines on a pipe of its own (`runtime.tracing`); the
node reads them (`spawn.forward_lines`), checks each (the app writes them: only the known fields, of
the right types and sizes, are kept) and holds the newest `PER_APP` of each app in memory, tagged
with the instance the pipe is of (never what the line says). The node API serves them
(`GET /traces/apps/{app}`); the API asks every node and merges (api/routes/traces.py). They go with
the node's process: this is a window on what just happened, not a store.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from osless.spans import PER_APP, check_span

__all__ = ["SpanStore"]

MAX_APPS = 1000  # apps with spans held at once: the oldest-fed goes past it


class SpanStore:
    """The newest PER_APP spans of each app on this node."""

    def __init__(self, per_app: int = PER_APP, max_apps: int = MAX_APPS) -> None:
        self.per_app = per_app
        self.max_apps = max_apps
        self._apps: dict[str, deque[dict[str, Any]]] = {}
        self.dropped = 0  # lines that were not spans

    def add(self, app: str, instance: str, line: str) -> None:
        """One line of an instance's span pipe."""
        span = check_span(line)
        if span is None:
            self.dropped += 1
            return
        span["app"], span["instance"] = app, instance
        held = self._apps.pop(app, None)  # re-inserted last: the dict's order is the apps' recency
        if held is None:
            held = deque(maxlen=self.per_app)
            while len(self._apps) >= self.max_apps:
                del self._apps[next(iter(self._apps))]
        held.append(span)
        self._apps[app] = held

    def spans(self, app: str, trace_id: str | None = None) -> list[dict[str, Any]]:
        held = self._apps.get(app, ())
        return [s for s in held if trace_id is None or s["trace_id"] == trace_id]

    def forget(self, app: str) -> None:
        self._apps.pop(app, None)
