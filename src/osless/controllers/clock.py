"""The clock: the leader fires each schedule's ticks (`@app.schedule`), on time, once.

Every controller reads the schedules (`GET /v1/schedules`: those of the apps' current releases, with
their state) every `REFRESH_S`; only the leader fires, by asking the API to run a tick
(`POST /v1/apps/{app}/schedules/{name}/ticks`, see api/schedules.py), which accepts each tick once
whoever asks and however often: a leader taking over mid-tick may fire the tick the old one fired.

When it starts leading (or sees a schedule first, or changed, or resumed) it looks back once: the
latest tick since the schedule's last run is fired if it is at most `GRACE_S` late (the old leader
died on it; so is each tick before it within `GRACE_S`), or, later than that, if the schedule says
`catch_up` (the platform was down: once, not once per missed tick); otherwise skipped. A schedule
that never ran has nothing to catch up. Then each tick fires as it comes; ticks missed while the
loop was held up are one, the latest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from osless import schedules
from osless.client import ApiError, AsyncApi
from osless.controllers.leader import Leadership

__all__ = ["Clock"]

log = logging.getLogger("osless.clock")

REFRESH_S = 1.0
GRACE_S = 5.0
NAP_S = 0.25  # the longest sleep: a refresh, a pause or a leadership change is seen within it
FIRE_S = 10.0
MAX_LOOK_BACK = 10  # fresh ticks fired at a take-over, before the latest

Key = tuple[str, str]


def _fingerprint(s: dict[str, Any]) -> tuple[Any, ...]:
    return (s.get("cron"), s.get("every_s"), s.get("tz"), s.get("catch_up"), s.get("changed_at"))


class Clock:
    def __init__(self, api: AsyncApi, leadership: Leadership) -> None:
        self.api = api
        self.leadership = leadership
        self.schedules: dict[Key, dict[str, Any]] = {}
        self.next: dict[Key, tuple[tuple[Any, ...], int]] = {}  # the spec it was computed for, the tick
        self.firing: set[asyncio.Task[None]] = set()
        self.broken: set[Key] = set()  # logged once

    async def run(self) -> None:
        refresher = asyncio.create_task(self._refresh())
        try:
            while True:
                if self.leadership.is_leader:
                    self.step(time.time())
                else:
                    self.next.clear()  # at its next lead it looks back from what the store says
                await asyncio.sleep(self._nap(time.time()))
        finally:
            refresher.cancel()
            for t in self.firing:
                t.cancel()

    def _nap(self, now: float) -> float:
        soonest = min((tick for _, tick in self.next.values()), default=now + NAP_S)
        return min(NAP_S, max(0.0, soonest - now))

    async def _refresh(self) -> None:
        while True:
            try:
                items = (await self.api.get("/v1/schedules"))["items"]
                self.schedules = {(s["app"], s["name"]): s for s in items}
            except ApiError as e:
                log.warning("reading the schedules: %s", e.message)
            except Exception:  # the API restarting: the next refresh reads them
                log.debug("reading the schedules", exc_info=True)
            await asyncio.sleep(REFRESH_S)

    def step(self, now: float) -> None:
        for key in set(self.next) - set(self.schedules):
            del self.next[key]  # gone from its app's current release
        for key, s in self.schedules.items():
            if s.get("paused"):
                self.next.pop(key, None)
                continue
            try:
                self._step_one(key, s, now)
            except ValueError as e:  # a zone the host no longer knows: this schedule only
                if key not in self.broken:
                    self.broken.add(key)
                    log.error("schedule %s.%s: %s", *key, e)

    def _step_one(self, key: Key, s: dict[str, Any], now: float) -> None:
        fp = _fingerprint(s)
        known = self.next.get(key)
        if known is None or known[0] != fp:
            due = schedules.last_tick(s, now)
            last = s.get("last_tick")
            since = max(last or 0, int(s.get("changed_at") or 0))  # ticks while paused do not count
            if last is not None and due > since:
                if now - due <= GRACE_S:
                    # The old leader may have stopped a few ticks back: each of those still fresh.
                    tick = schedules.next_tick(s, max(since, now - GRACE_S - 1))
                    for _ in range(MAX_LOOK_BACK):
                        if tick >= due:
                            break
                        self._fire(key, tick)
                        tick = schedules.next_tick(s, tick)
                    self._fire(key, due)
                elif s.get("catch_up"):
                    log.info("schedule %s.%s: catching up on the tick of %d", *key, due)
                    self._fire(key, due)
                else:
                    log.info("schedule %s.%s: ticks missed since %d skipped (catch_up is off)", *key, since)
            self.next[key] = (fp, schedules.next_tick(s, now))
        elif now >= known[1]:
            self._fire(key, known[1])
            self.next[key] = (fp, schedules.next_tick(s, now))

    def _fire(self, key: Key, tick: int) -> None:
        task = asyncio.create_task(self._post(key, tick))
        self.firing.add(task)
        task.add_done_callback(self.firing.discard)

    async def _post(self, key: Key, tick: int) -> None:
        app, name = key
        while True:
            try:
                await asyncio.wait_for(
                    self.api.post(f"/v1/apps/{app}/schedules/{name}/ticks", {"tick": tick}), FIRE_S
                )
                return
            except ApiError as e:
                if 0 < e.status < 500:  # refused, and would be again
                    if e.code != "schedule_paused":  # paused since the last refresh: as asked
                        log.warning("schedule %s.%s, tick %d: %s", app, name, tick, e.message)
                    return
                problem = e.message
            except Exception as e:  # the API restarting, or slow
                problem = repr(e)
            # Again while the tick is fresh (fired twice, it runs once); past that, the next one.
            if time.time() - tick > GRACE_S or not self.leadership.is_leader:
                log.warning("schedule %s.%s, tick %d not fired: %s", app, name, tick, problem)
                return
            await asyncio.sleep(0.5)
