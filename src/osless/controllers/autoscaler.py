"""The autoscaler: instances follow concurrency, in the manner of Knative's KPA.

Every tick it reads what the gateways saw (average requests in flight per app), keeps a stable
window and a short panic window of it, and wants `ceil(concurrency / target)` instances. A burst
that would double the instances switches to the panic window, which scales up at once and never
down. With `min` at 0, an app that saw no request for its idle window goes to zero; the gateway's
activator wakes it again on the next request. The decision and its reason go to the app's
status (`desired`, `scale_reason`: apart from its spec), which the scheduler and `osless ps` read.

Queues drive it too, as KEDA's scalers do: an app whose queues hold messages wants at least
`ceil(depth / (batch_size * target))` instances (a batch is one request, `target` of them per
instance), no more than its consumer's `max_concurrency` batches can use, and is never idle (so one
at zero is woken, and one draining a backlog does not go to zero under it).

Every controller process samples; only the one whose `Leadership` holds writes decisions, so a new
leader takes over with the windows already full.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from osless.client import ApiError, AsyncApi, ModelInformer
from osless.contracts import App, AppStatus
from osless.controllers.leader import Leadership

__all__ = ["Autoscaler", "backlog_wants", "decide"]

log = logging.getLogger("osless.autoscaler")

TICK_S = 1.0


@dataclass
class Window:
    """One app's recent concurrency samples, and when it last saw traffic."""

    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))
    last_active: float = 0.0
    panic_until: float = 0.0
    release: int | None = None

    def average(self, now: float, seconds: float) -> float:
        recent = [c for t, c in self.samples if t >= now - seconds]
        return sum(recent) / len(recent) if recent else 0.0


def backlog_wants(app: App, queues: list[dict[str, Any]]) -> tuple[int, int]:
    """(instances the app's queues want, messages waiting in them)."""
    target = app.autoscale.target
    wanted, depth = 0, 0
    for q in queues:
        n = int(q.get("depth", 0))
        if n <= 0:
            continue
        depth += n
        batch, concurrency = max(1, int(q.get("batch_size", 1))), max(1, int(q.get("max_concurrency", 1)))
        wanted = max(wanted, min(math.ceil(n / (batch * target)), math.ceil(concurrency / target)))
    return wanted, depth


def decide(
    app: App, current: int, window: Window, now: float, queued: tuple[int, int] = (0, 0)
) -> tuple[int, str]:
    """The instances `app` should have now (it wants `current`), and why (`queued`: `backlog_wants`)."""
    policy = app.autoscale
    target = policy.target
    lo, hi = app.min, app.max
    stable = window.average(now, policy.stable_s)
    panic = window.average(now, policy.panic_s)
    want_stable, want_panic = math.ceil(stable / target), math.ceil(panic / target)
    if want_panic >= 2 * max(current, 1) and want_panic > current:
        window.panic_until = now + policy.panic_s
    if now < window.panic_until:
        wanted, reason = max(current, want_panic), f"panic: {panic:.1f} in flight over the short window"
    else:
        wanted, reason = want_stable, f"{stable:.1f} in flight on average, target {target:g} per instance"
    idle = now - window.last_active
    if lo == 0 and idle > policy.idle_s:
        # No request for the whole idle window: whatever the averages still remember, go to zero.
        wanted, reason = 0, f"no request for {idle:.0f}s: scaled to zero"
    elif wanted == 0:
        wanted, reason = 1, "kept warm: traffic within the idle window" if lo == 0 else reason
    by_queue, depth = queued
    if depth > 0 and by_queue > wanted:
        wanted, reason = by_queue, f"{depth} messages queued"
    wanted = min(hi, max(lo, wanted))
    return wanted, reason


class Autoscaler:
    def __init__(self, api: AsyncApi, leadership: Leadership, tick_s: float = TICK_S) -> None:
        self.api = api
        self.leadership = leadership
        self.tick_s = tick_s
        self.apps = ModelInformer(api, "/v1/apps", App, key=lambda a: a.name)
        self.statuses = ModelInformer(api, "/v1/appstatus", AppStatus, key=lambda s: s.app)
        self.windows: dict[str, Window] = {}

    async def run(self) -> None:
        informers = [asyncio.create_task(self.apps.run()), asyncio.create_task(self.statuses.run())]
        try:
            await self.apps.synced.wait()
            await self.statuses.synced.wait()
            while True:
                try:
                    await self.tick(time.time())
                except ApiError:
                    pass
                except Exception:  # a bad record must not stop the autoscaling of every app
                    log.exception("autoscaler tick failed")
                await asyncio.sleep(self.tick_s)
        finally:
            for t in informers:
                t.cancel()

    async def tick(self, now: float) -> None:
        stats = (await self.api.get("/v1/stats"))["apps"]
        queues: dict[str, list[dict[str, Any]]] = {}
        try:
            for q in (await self.api.get("/v1/queues"))["items"]:
                queues.setdefault(q["app"], []).append(q)
        except ApiError:
            pass  # the message engine away: the apps follow their traffic alone meanwhile
        for name, app in list(self.apps.items.items()):
            if app.current_release is None:
                continue
            window = self.windows.setdefault(name, Window(last_active=now))  # a restart counts as activity
            seen = stats.get(name) or {}
            concurrency = float(seen.get("concurrency", 0.0)) + float(seen.get("waiting", 0.0))
            window.samples.append((now, concurrency))
            if concurrency > 0 or float(seen.get("requests", 0.0)) > 0:
                window.last_active = now
            # a new release or a wake-up is activity too: the idle clock starts again
            if app.current_release != window.release:
                window.release, window.last_active = app.current_release, now
            queued = backlog_wants(app, queues.get(name, []))
            if queued[1] > 0:  # messages waiting are activity: woken at zero, and kept up to drain
                window.last_active = now
            status = self.statuses.items.get(name) or AppStatus(app=name)
            desired = status.desired
            window.last_active = max(window.last_active, status.woken_at or 0.0)
            wanted, reason = decide(app, int(desired or 0), window, now, queued)
            if wanted != desired and self.leadership.is_leader:
                log.info("%s: %s -> %s instances (%s)", name, desired, wanted, reason)
                try:
                    updated = await self.api.put(
                        f"/v1/apps/{name}/desired", {"desired": wanted, "reason": reason}
                    )
                    self.statuses.items[name] = AppStatus.model_validate(updated)
                except ApiError as e:
                    log.warning("autoscaling %s: %s", name, e.message)
        for gone in set(self.windows) - set(self.apps.items):
            del self.windows[gone]
