"""What the gateway sees of each app: requests in flight, waiting for an instance, and their rate.

The autoscaler scales on the average in flight over each report's interval, so every change of
the count adds to an integral rather than being sampled now and then. On the hot path a change
is two additions, on the loop's own clock (`loop.time()`, read once per turn of the loop): the
integral of the count over an interval is what the count is now times the interval's end, plus
the time of each end, minus the time of each start (`_AppTraffic.acc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from osless.client import ApiError, AsyncApi

__all__ = ["AppTraffic", "Traffic"]

log = logging.getLogger("osless.gateway")

REPORT_EVERY_S = 1.0


class AppTraffic:
    """One app's counts. The in-flight integral since the last snapshot is
    `acc + in_flight * now` (and the same of `waiting`): a start at `t` takes `t` off, an end
    at `t` adds it, and a snapshot at `t` starts the next interval with `-count * t`."""

    __slots__ = ("acc", "in_flight", "requests", "waiting", "waiting_acc")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting = 0
        self.requests = 0
        self.acc = 0.0
        self.waiting_acc = 0.0

    def start(self, now: float) -> None:
        """A request is served from `now` (the hot path: no call beyond this one)."""
        self.in_flight += 1
        self.requests += 1
        self.acc -= now

    def end(self, now: float) -> None:
        self.in_flight -= 1
        self.acc += now


class Traffic:
    def __init__(self, clock: Callable[[], float]) -> None:
        """`clock`: the gateway loop's `time`, as the hot path passes it in."""
        self.apps: dict[str, AppTraffic] = {}
        self.clock = clock
        self._since = clock()

    def of(self, app: str) -> AppTraffic:
        """`app`'s counts; kept while anything of it is counted (until a snapshot finds it idle)."""
        found = self.apps.get(app)
        if found is None:
            found = self.apps[app] = AppTraffic()
            # Its integral so far is zero: as if it had been counted since the interval began.
        return found

    def in_flight(self, app: str) -> int:
        found = self.apps.get(app)
        return found.in_flight + found.waiting if found else 0

    @contextlib.contextmanager
    def waiting(self, app: str) -> Iterator[None]:
        """A request held while an instance of `app` starts (the activator)."""
        t = self.of(app)
        t.waiting += 1
        t.waiting_acc -= self.clock()
        try:
            yield
        finally:
            t.waiting -= 1
            t.waiting_acc += self.clock()

    def snapshot(self) -> tuple[float, dict[str, dict[str, float]]]:
        """Averages since the last snapshot, which starts the next interval."""
        now = self.clock()
        interval = max(now - self._since, 1e-6)
        self._since = now
        out = {}
        for app, t in list(self.apps.items()):
            area = t.acc + t.in_flight * now
            waiting_area = t.waiting_acc + t.waiting * now
            out[app] = {
                "concurrency": round(max(area, 0.0) / interval, 3),
                "requests": float(t.requests),
                "waiting": round(max(waiting_area, 0.0) / interval, 3),
            }
            t.acc = -t.in_flight * now
            t.waiting_acc = -t.waiting * now
            t.requests = 0
            if not (t.in_flight or t.waiting or out[app]["requests"]):
                del self.apps[app]  # idle: reported as zero once, then forgotten
        return interval, out

    async def report(self, api: AsyncApi, name: str) -> None:
        """Tell the API every second; the autoscaler reads it from there. Once a report of nothing
        has landed, the next ones of nothing are not sent: a report that stops counting, a few
        seconds on (`routes.apps.STATS_FRESH_S`), says no more than it did, and an idle platform
        then writes its store once a second less per gateway."""
        said_nothing = False
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            interval, apps = self.snapshot()
            if not apps and said_nothing:
                continue
            said_nothing = False
            try:
                await api.put(f"/v1/gateways/{name}/stats", {"interval_s": interval, "apps": apps})
                said_nothing = not apps
            except ApiError as e:
                log.debug("stats not reported: %s", e.message)
