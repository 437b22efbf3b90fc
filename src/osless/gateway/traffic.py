"""What the gateway sees of each app: requests in flight, waiting for an instance, and their rate.

The autoscaler scales on the average in flight over each report's interval, so every change of
the count adds its duration to an integral rather than being sampled now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from osless.client import ApiError, AsyncApi

__all__ = ["Traffic"]

log = logging.getLogger("osless.gateway")

REPORT_EVERY_S = 1.0


@dataclass
class _AppTraffic:
    in_flight: int = 0
    waiting: int = 0
    requests: int = 0
    area: float = 0.0  # in-flight x seconds since the last report
    waiting_area: float = 0.0
    changed: float = 0.0

    def advance(self, now: float) -> None:
        dt = now - self.changed
        self.area += self.in_flight * dt
        self.waiting_area += self.waiting * dt
        self.changed = now


class Traffic:
    def __init__(self) -> None:
        self.apps: dict[str, _AppTraffic] = {}
        self._since = time.monotonic()

    def _get(self, app: str) -> _AppTraffic:
        found = self.apps.get(app)
        if found is None:
            found = self.apps[app] = _AppTraffic(changed=time.monotonic())
        return found

    def in_flight(self, app: str) -> int:
        found = self.apps.get(app)
        return found.in_flight + found.waiting if found else 0

    @contextlib.contextmanager
    def waiting(self, app: str) -> Iterator[None]:
        """A request held while an instance of `app` starts (the activator)."""
        t = self._get(app)
        t.advance(time.monotonic())
        t.waiting += 1
        try:
            yield
        finally:
            t.advance(time.monotonic())
            t.waiting -= 1

    # A request being served: two calls rather than a context manager, for the gateway's hot
    # path (a generator context costs more), and because the fast path ends in a callback.
    def start(self, app: str) -> None:
        t = self._get(app)
        t.advance(time.monotonic())
        t.in_flight += 1
        t.requests += 1

    def end(self, app: str) -> None:
        t = self._get(app)
        t.advance(time.monotonic())
        t.in_flight -= 1

    def snapshot(self) -> tuple[float, dict[str, dict[str, float]]]:
        """Averages since the last snapshot, which starts the next interval."""
        now = time.monotonic()
        interval = max(now - self._since, 1e-6)
        self._since = now
        out = {}
        for app, t in list(self.apps.items()):
            t.advance(now)
            out[app] = {
                "concurrency": round(t.area / interval, 3),
                "requests": float(t.requests),
                "waiting": round(t.waiting_area / interval, 3),
            }
            t.area = t.waiting_area = 0.0
            t.requests = 0
            if not (t.in_flight or t.waiting or out[app]["requests"]):
                del self.apps[app]  # idle: reported as zero once, then forgotten
        return interval, out

    async def report(self, api: AsyncApi, name: str) -> None:
        """Tell the API every second; the autoscaler reads it from there."""
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            interval, apps = self.snapshot()
            try:
                await api.put(f"/v1/gateways/{name}/stats", {"interval_s": interval, "apps": apps})
            except ApiError as e:
                log.debug("stats not reported: %s", e.message)
