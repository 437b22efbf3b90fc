"""The last hour of each app's figures, for the dashboard's charts: a bounded ring in the API process.

Nothing in the platform keeps a per-app history finer than the hour (`/usage/{app}/{hour}`); the
nodes' live views (`/nodeusage/{node}`, replaced each second, merged by `api.usage.top`) are what
`osless top` shows now. So one sampler per API process reads that same merged view every
`SAMPLE_S`, with each app's desired and ready instances, and keeps `POINTS` samples per app: an
hour, in memory, bounded by the number of apps. It starts with the dashboard's first request (a
server nobody looks at spends nothing), so its history begins then, and a restart forgets it.
Each server of a cluster keeps its own, from the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections import deque
from typing import Any

from osless.api.resources import Resources
from osless.api.usage import top

__all__ = ["FIELDS", "POINTS", "SAMPLE_S", "Series"]

log = logging.getLogger("osless.api.ui")

SAMPLE_S = 2.0
POINTS = int(3600 / SAMPLE_S)
# A sample packed: its time as a double, the figures as floats (NaN: none), 48 bytes and one object,
# so an hour of an app is ~170 KB, not the ~700 KB of lists of Python floats.
PACKED = struct.Struct("<d10f")
_AT = struct.calcsize("<d")  # where a packed sample's figures start, after its time
Point = list[float | None]
# One sample: its time, then these, in this order (the page's charts read them by index).
FIELDS = (
    "requests_per_s",
    "errors_per_s",
    "p50_ms",
    "p99_ms",
    "desired",
    "ready",
    "memory_mb",
    "cpu",
    "cold_starts",
    "client_errors_per_s",
)


class Series:
    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self.rings: dict[str, deque[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tick = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dashboard series")

    def history(self, app: str) -> list[Point]:
        return [_unpack(p) for p in self.rings.get(app, ())]

    async def next_point(self, app: str, timeout: float) -> Point | None:
        """The next sample of `app`, or None if none came within `timeout`."""
        points = await self.next_points({app}, timeout)
        return points.get(app)

    async def next_points(self, apps: set[str], timeout: float) -> dict[str, Point]:
        """The next sample of each of `apps` (empty if none came within `timeout`)."""
        tick = self._tick
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tick.wait(), timeout)
            return {app: _unpack(ring[-1]) for app, ring in self.rings.items() if app in apps and ring}
        return {}

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # the next round tries again; charts show a gap meanwhile
                log.exception("dashboard sample failed")
            await asyncio.sleep(SAMPLE_S)

    async def sample(self) -> None:
        apps, _ = await self.resources.list_apps()
        names = [a.name for a in apps]
        statuses, _ = await self.resources.list_app_statuses()
        desired = {s.app: s.desired for s in statuses}
        instances, _ = await self.resources.list_instances()
        ready: dict[str, int] = {}
        for inst in instances:
            if inst.status.phase == "ready":
                ready[inst.app] = ready.get(inst.app, 0) + 1
        at = time.time()
        view = (await top(self.resources.store, at, names))["apps"]
        for name in names:
            figures: dict[str, Any] = view.get(name, {})
            point: Point = [
                round(at, 1),
                figures.get("requests_per_s", 0.0)
                - figures.get("errors_per_s", 0.0)
                - figures.get("client_errors_per_s", 0.0),
                figures.get("errors_per_s", 0.0),
                figures.get("p50_ms"),
                figures.get("p99_ms"),
                desired.get(name) or 0,
                ready.get(name, 0),
                round(figures.get("memory", 0) / 2**20, 1),
                figures.get("cpu", 0.0),
                figures.get("cold_starts", 0),
                figures.get("client_errors_per_s", 0.0),
            ]
            packed = PACKED.pack(*(math.nan if v is None else float(v) for v in point))
            ring = self.rings.setdefault(name, deque(maxlen=POINTS))
            # Figures that stand still keep the first and the last sample of the run, not each (a
            # chart draws the same line): an app at rest costs two samples, not an hour's. Apps are
            # cheap to make, so else a token that may deploy would make each API process keep
            # ~170 KB per app it names.
            if len(ring) >= 2 and ring[-1][_AT:] == packed[_AT:] == ring[-2][_AT:]:
                ring[-1] = packed
                if PACKED.unpack(ring[-2])[0] < at - POINTS * SAMPLE_S:  # the run starts an hour ago
                    ring[-2] = PACKED.pack(round(at - POINTS * SAMPLE_S, 1), *PACKED.unpack(packed)[1:])
            else:
                ring.append(packed)
        for gone in set(self.rings) - set(names):
            del self.rings[gone]
        # Wake every listener, then arm a new event for the next round.
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()


def _unpack(packed: bytes) -> Point:
    at, *figures = PACKED.unpack(packed)
    return [round(at, 1), *(None if math.isnan(v) else round(v, 3) for v in figures)]
