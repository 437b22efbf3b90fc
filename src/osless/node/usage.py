"""What the node tells the API each second for `osless top`, and each minute for `osless usage`.

A `Sampler` reads, each second, what the node keeps anyway: the gateway processes' request
figures (`GatewayPool.figures`: counts, status classes, latency buckets, per app and function) and
the kernel's accounting of each instance's cgroup (CPU time, memory in use; `Supervisor.usage`,
and the CPU of runs that ended, `Meter`). From the change since the last second it makes:

- `now`: the node's live view (requests/s, errors/s and in flight per app, latency buckets of the
  last `WINDOW_S` seconds for p50/p99, cold starts, CPU and memory per instance), sent each second
  (`PUT /v1/nodes/{node}/usage`): the API keeps the newest per node, and `GET /v1/top` merges them;
- usage: per app, function and hour: invocations, errors, seconds in the gateway; per app and hour:
  CPU seconds, GB-seconds (memory in use, integrated over time), cold starts. Summed here for a
  minute, then sent in the same call and added to the app's hourly buckets in the store: one
  write per app per node per minute, whatever the traffic. What could not be sent is kept and sent
  with the next minute's. The minute so far rides along each second's report (`pending`), so
  `osless usage` is current to the second; a node that dies loses at most its last minute.

Nothing here asks the app anything: the gateway's timings and the kernel's accounting only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from osless.client import ApiError, AsyncApi
from osless.metering import BUCKETS

if TYPE_CHECKING:
    from osless.gateway.pool import GatewayPool
    from osless.node.metrics import Meter
    from osless.node.supervisor import Supervisor

__all__ = ["Sampler"]

log = logging.getLogger("osless.node")

EVERY_S = 1.0
WINDOW_S = 10  # seconds of latency behind `now`'s p50 and p99
FLUSH_S = 60.0  # usage is sent (and written to the store) this often
MAX_PENDING = 10_000  # (hour, app, function) rows kept while the API is away; the oldest go first
GIB = float(1 << 30)


def _hour(t: float) -> int:
    return int(t // 3600 * 3600)


class Sampler:
    def __init__(
        self, api: AsyncApi, node: str, pool: GatewayPool, supervisors: Mapping[str, Supervisor], meter: Meter
    ) -> None:
        self.api = api
        self.node = node
        self.pool = pool
        self.supervisors = supervisors
        self.meter = meter
        self._at = time.monotonic()
        self._requests: dict[tuple[str, str], tuple[list[int], list[int], float]] = {}
        self._cpu: dict[str, float] = {}  # instance -> CPU seconds at the last sample
        self._app_cpu: dict[str, float] = {}
        self._starts: dict[str, int] = {}
        self._window: collections.deque[dict[str, list[int]]] = collections.deque(maxlen=WINDOW_S)
        # (hour, app, function) -> figures; function "" holds the app's CPU, GB-s and cold starts
        self.pending: dict[tuple[int, str, str], dict[str, float]] = {}
        self._flushed = time.monotonic()
        self.now: dict[str, Any] = {"apps": {}, "instances": []}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            try:
                self.sample(time.time())
            except Exception:  # a bug: the next second tries again, the node goes on
                log.exception("usage sample failed")
                continue
            body: dict[str, Any] = {"now": self.now}
            flush = time.monotonic() - self._flushed >= FLUSH_S
            # Each second the minute so far (`pending`), which the API adds to what it shows and
            # forgets with the next report; once a minute the same as `usage`, which it stores.
            body["usage" if flush else "pending"] = self.rows()
            try:
                await self.api.put(f"/v1/nodes/{self.node}/usage", body)
            except ApiError as e:
                log.debug("usage not reported: %s", e.message)
                continue
            except Exception:  # a bug: never the node's end (its parts stop it when one ends)
                log.exception("usage not reported")
                continue
            if flush:
                self.pending.clear()
                self._flushed = time.monotonic()

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"hour": h, "app": a, "function": f, **figures} for (h, a, f), figures in self.pending.items()
        ]

    def _add(self, key: tuple[int, str, str], **figures: float) -> None:
        row = self.pending.get(key)
        if row is None:
            if len(self.pending) >= MAX_PENDING:
                self.pending.pop(next(iter(self.pending)))
            row = self.pending[key] = {}
        for name, n in figures.items():
            if n:
                row[name] = row.get(name, 0) + n

    def sample(self, wall: float) -> None:
        """One second's change: into `now`, and into the pending usage."""
        mono = time.monotonic()
        dt = max(mono - self._at, 1e-3)
        self._at = mono
        hour = _hour(wall)
        figures = self.pool.figures()
        apps: dict[str, dict[str, Any]] = {}
        second: dict[str, list[int]] = {}

        def app_view(app: str) -> dict[str, Any]:
            view = apps.get(app)
            if view is None:
                view = apps[app] = {
                    "requests": 0,
                    "errors": 0,
                    "client_errors": 0,
                    "in_flight": 0,
                    "cpu": 0.0,
                    "memory": 0,
                }
            return view

        seen: set[tuple[str, str]] = set()
        for (app, fn), s in figures.series.items():
            seen.add((app, fn))
            before = self._requests.get((app, fn))
            codes, buckets = list(s.codes), list(s.buckets)
            self._requests[(app, fn)] = (codes, buckets, s.total)
            if before is None or sum(codes) < sum(before[0]):  # new, or counted afresh: all of it is new
                before = ([0] * len(codes), [0] * len(buckets), 0.0)
            d_codes = [a - b for a, b in zip(codes, before[0], strict=True)]
            d_buckets = [a - b for a, b in zip(buckets, before[1], strict=True)]
            n = sum(d_codes)
            if not n:
                continue
            view = app_view(app)
            view["requests"] += n
            view["errors"] += d_codes[4]
            view["client_errors"] += d_codes[3]
            into = second.setdefault(app, [0] * (len(BUCKETS) + 1))
            for i, k in enumerate(d_buckets):
                into[i] += k
            self._add((hour, app, fn), invocations=n, errors=d_codes[4], duration_s=s.total - before[2])
        for key in [k for k in self._requests if k not in seen]:
            del self._requests[key]
        self._window.append(second)
        for app, n in figures.in_flight.items():
            app_view(app)["in_flight"] = n

        instances = []
        app_cpu: dict[str, float] = dict(self.meter.cpu_ended)
        app_memory: dict[str, int] = {}
        live: set[str] = set()
        for iid, sup in list(self.supervisors.items()):
            cpu, memory = sup.usage()
            live.add(iid)
            cores = max(0.0, cpu - self._cpu.get(iid, cpu)) / dt
            self._cpu[iid] = cpu
            app_cpu[sup.app] = app_cpu.get(sup.app, 0.0) + cpu
            app_memory[sup.app] = app_memory.get(sup.app, 0) + memory
            view = app_view(sup.app)
            view["cpu"] += cores
            view["memory"] += memory
            instances.append(
                {
                    "id": iid,
                    "app": sup.app,
                    "phase": str(sup.status.get("phase")),
                    "cpu": round(cores, 4),
                    "memory": memory,
                }
            )
        for iid in [i for i in self._cpu if i not in live]:
            del self._cpu[iid]
        for app in set(app_cpu) | set(self._app_cpu) | set(self.meter.starts):
            d_cpu = max(0.0, app_cpu.get(app, 0.0) - self._app_cpu.get(app, 0.0))
            starts = sum(self.meter.starts.get(app, ()))
            d_starts = max(0, starts - self._starts.get(app, 0))
            self._starts[app] = starts
            gb_s = app_memory.get(app, 0) / GIB * dt
            self._add((hour, app, ""), cpu_s=d_cpu, gb_s=gb_s, cold_starts=d_starts)
            if starts:
                app_view(app)["cold_starts"] = starts
        self._app_cpu = app_cpu
        window: dict[str, list[int]] = {}
        for sec in self._window:
            for app, counts in sec.items():
                into = window.setdefault(app, [0] * len(counts))
                for i, k in enumerate(counts):
                    into[i] += k
        for app in window:
            app_view(app)
        for app, view in apps.items():
            view["requests_per_s"] = round(view.pop("requests") / dt, 3)
            view["errors_per_s"] = round(view.pop("errors") / dt, 3)
            view["client_errors_per_s"] = round(view.pop("client_errors") / dt, 3)
            view["cpu"] = round(view["cpu"], 4)
            view["latency_buckets"] = window.get(app, [])
            view.setdefault("cold_starts", 0)
        self.now = {"apps": apps, "instances": instances, "at": wall}
