"""What a gateway process counts of each request, for its node's `GET /metrics` (`node.metrics`).

The hot path is one call (`Metrics.end`, from the end of each exchange with an instance) of a few
additions into plain lists: no lock, no prometheus-client object, no label lookup. Every second the
process sends its figures since it started, whole, to its node over the control socket it already
has with it (`snapshot`, one JSON line: `gateway.process`), and the node sums its processes'
(`gateway.pool`), so a scrape never waits on a gateway and the processes share no file.

Labels are the app and the function (`web` for a web request), and the status class: no path, no
id, so a series exists only for what is deployed; an app deleted from the routing table is dropped
at the next snapshot.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from osless.gateway.http import TooLarge
from osless.metering import BUCKETS

if TYPE_CHECKING:
    from osless.gateway.proxy import _Exchange

__all__ = ["BUCKETS", "Figures", "Metrics", "Series"]

WEB = "web"
_INVOKE = b"POST /invoke/"  # the head of a function call, as `Gateway._function` makes it
_CLASS = (0, 0, 1, 2, 3, 4, 4, 4, 4, 4)  # status // 100 -> its class's place in `Series.codes` (1xx..5xx)
_bisect = bisect.bisect_left


class Series:
    """One app's function's counts: answers by status class (1xx..5xx), latency buckets (not
    cumulative; the last is past every bound), and the sum of latencies."""

    __slots__ = ("buckets", "codes", "total")

    def __init__(self) -> None:
        self.codes = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class Metrics:
    """A gateway process's counts since it started. `enabled` False (`--no-metrics`) counts nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.series: dict[tuple[str, str], Series] = {}
        self._web: dict[str, Series] = {}  # app -> its `web` series, found without a tuple made

    def end(self, ex: _Exchange, now: float) -> None:
        """An exchange with an instance ended at `now` (`_Exchange.end`, on the loop's clock):
        counted if it answered the client.
        One that answered nothing was tried again on another instance (counted there) or lost its
        client before any answer."""
        conn = ex.conn
        if not self.enabled or not conn.responded:
            return
        up = ex.up
        parser = up._parser  # the answer's status, which the upstream parsed already
        if up.started and parser is not None:
            code = parser.get_status_code()
        else:  # answered by the gateway itself: `_Exchange.settle`'s 413, 504 or 502
            code = 413 if isinstance(up.error, TooLarge) else 502
        backend = ex.backend
        if up.pool is backend.control:
            head = ex.head
            key = (backend.app, head[len(_INVOKE) : head.find(b" ", len(_INVOKE))].decode("latin-1"))
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = Series()
        else:
            s = self._web.get(backend.app)
            if s is None:
                s = self._web[backend.app] = self.series[(backend.app, WEB)] = Series()
        seconds = now - (ex.ends - ex.timeouts.whole)  # `ends` is its start + `whole`
        s.codes[_CLASS[code // 100 % 10]] += 1
        s.buckets[_bisect(BUCKETS, seconds)] += 1
        s.total += seconds

    def snapshot(
        self, deployed: Collection[str], in_flight: Mapping[str, int], connections: int
    ) -> dict[str, Any]:
        """What is sent to the node: everything counted since the process started (the node sums
        processes, and keeps what a process that died had counted). Apps no longer `deployed` are
        forgotten first."""
        for key in [k for k in self.series if k[0] not in deployed]:
            del self.series[key]
            self._web.pop(key[0], None)
        return {
            "series": [[app, fn, s.codes, s.buckets, s.total] for (app, fn), s in self.series.items()],
            "in_flight": {a: n for a, n in in_flight.items() if n and a in deployed},
            "connections": connections,
            "apps": sorted(deployed),
        }


class Figures:
    """The sum of gateway processes' snapshots (`GatewayPool.figures`): what a node's /metrics shows."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}
        self.in_flight: dict[str, int] = {}
        self.connections = 0
        self.apps: set[str] = set()  # deployed, as the live processes' routing tables say

    def add(self, snap: Mapping[str, Any], counters_only: bool = False) -> None:
        """Add one process's snapshot; `counters_only` for a process that has died (its requests
        stay counted; its connections and requests in flight are gone)."""
        for app, fn, codes, buckets, total in snap.get("series", ()):
            s = self.series.get((app, fn))
            if s is None:
                s = self.series[(app, fn)] = Series()
            if len(codes) != len(s.codes) or len(buckets) != len(s.buckets):
                continue  # from a gateway of another release, with other buckets: not summed
            s.codes = [a + int(b) for a, b in zip(s.codes, codes, strict=True)]
            s.buckets = [a + int(b) for a, b in zip(s.buckets, buckets, strict=True)]
            s.total += float(total)
        if not counters_only:
            self.apps.update(snap.get("apps", ()))
            for app, n in snap.get("in_flight", {}).items():
                self.in_flight[app] = self.in_flight.get(app, 0) + int(n)
            self.connections += int(snap.get("connections", 0))

    def forget(self, keep: Collection[str]) -> None:
        """Drop the series of apps not in `keep` (deleted)."""
        for key in [k for k in self.series if k[0] not in keep]:
            del self.series[key]
