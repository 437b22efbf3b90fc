"""Schedules (`@app.schedule`): which the current releases declare, their ticks fired, paused, and runs.

What a schedule is comes from the app's CURRENT release's manifest: a deploy that drops one stops it,
a rollback brings the old one back. What happened to it is the store's, apart from any release
(`/schedules/{app}/{name}`): paused or not, its last tick fired, and its recent runs (tick and
invocation id; their outcome is the invocation's state, read when the history is asked for).

A tick is fired by the controllers' leader (controllers/clock.py) through `fire`: the run is an
async invocation of the function of the schedule's name, with the idempotency key
`sched:{name}:{tick}`, so its id and the engine's `Nats-Msg-Id` are the tick's own: a tick fired
twice (a leader change mid-tick, two leaders for a moment, a retry after a timeout) is accepted once.
The invocation is durable (JetStream) before `fire` answers, and only then is the tick recorded: a
failure in between leaves a tick the next leader fires again, never one recorded but not run.
Retries, the dead-letter queue and the wake from zero are the async invocations'.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, Field

from osless import schedules
from osless.api import invocations
from osless.api.broker import Broker
from osless.api.errors import ApiError
from osless.api.models import now
from osless.api.resources import put_of_app
from osless.api.state import ApiState
from osless.contracts import App, ScheduleManifest
from osless.store import Conflict, Store

__all__ = ["MAX_RUNS", "ScheduleState", "fire", "history", "list_schedules", "set_paused"]

PREFIX = "/schedules/"
MAX_RUNS = 50  # runs kept in a schedule's record: its history
FUTURE_S = 2.0  # a tick this far ahead of the API's clock is refused: the leader's clock is off


class Run(BaseModel):
    tick: int
    id: str  # the invocation's
    fired_at: float


class ScheduleState(BaseModel):
    """What happened to one schedule, whatever release declares it."""

    paused: bool = False
    changed_by: str = ""  # who paused or resumed it
    changed_at: float = 0.0
    last_tick: int | None = None
    runs: list[Run] = Field(default_factory=list)


def _key(app: str, name: str) -> str:
    return f"{PREFIX}{app}/{name}"


async def _state(store: Store, app: str, name: str) -> tuple[ScheduleState, int | None]:
    kv = await store.get(_key(app, name))
    if kv is None:
        return ScheduleState(), None
    return ScheduleState.model_validate_json(kv.value), kv.mod_revision


async def _update(store: Store, app: str, name: str, change: Any) -> ScheduleState:
    """`change(state)` applied with a compare-and-swap, again on a conflict."""
    for _ in range(20):
        got, rev = await _state(store, app, name)
        change(got)
        try:
            # Only while the app stands: a tick fired as it is deleted leaves no schedule behind.
            await put_of_app(store, app, [(_key(app, name), got.model_dump_json().encode(), rev or 0)])
            return got
        except Conflict:
            continue
    raise ApiError(409, "conflict", f"schedule {app}.{name} is changing too often; try again")


# Releases never change: each one's schedules, read once, by app, version and image (a new app of
# an old name starts its versions again, never with the same image). Bounded: dropped whole when full.
_DECLARED: dict[tuple[str, int, str | None], dict[str, ScheduleManifest]] = {}
_DECLARED_MAX = 4096


async def _declared(state: ApiState, app: str, found: App | None = None) -> dict[str, ScheduleManifest]:
    """The schedules of the app's current release (none before its first)."""
    a = found or await state.resources.get_app(app)
    if a.current_release is None:
        return {}
    key = (app, a.current_release, a.current_image)
    if (known := _DECLARED.get(key)) is None:
        release = await state.resources.get_release(app, a.current_release)
        if len(_DECLARED) >= _DECLARED_MAX:
            _DECLARED.clear()
        known = _DECLARED[key] = dict(release.manifest.schedules)
    return known


def _view(app: str, name: str, spec: ScheduleManifest, got: ScheduleState) -> dict[str, Any]:
    spec_json = spec.model_dump(mode="json")
    try:
        upcoming: int | None = schedules.next_tick(spec_json, time.time())
    except ValueError:  # a zone the host no longer knows: shown, never fired
        upcoming = None
    return {
        "app": app,
        "name": name,
        "cron": spec.cron,
        "every_s": spec.every_s,
        "tz": spec.tz,
        "catch_up": spec.catch_up,
        "paused": got.paused,
        "changed_at": got.changed_at,
        "last_tick": got.last_tick,
        "next_tick": None if got.paused else upcoming,
    }


async def list_schedules(state: ApiState, app: str | None = None) -> list[dict[str, Any]]:
    """Every app's schedules (or one app's), as their current releases declare them, with their state."""
    store = state.resources.store
    apps = [await state.resources.get_app(app)] if app is not None else (await state.resources.list_apps())[0]
    out = []
    for a in apps:
        name = a.name
        try:
            declared = await _declared(state, name, a)
        except ApiError:
            if app is not None:
                raise
            continue  # deleted meanwhile
        if not declared:
            continue
        kept = {kv.key.rsplit("/", 1)[1]: kv for kv in (await store.list(f"{PREFIX}{name}/"))[0]}
        for sname, spec in sorted(declared.items()):
            kv = kept.get(sname)
            got = ScheduleState.model_validate_json(kv.value) if kv is not None else ScheduleState()
            out.append(_view(name, sname, spec, got))
    return out


async def _spec(state: ApiState, app: str, name: str) -> ScheduleManifest:
    declared = await _declared(state, app)
    if name not in declared:
        names = ", ".join(sorted(declared)) or "none"
        raise ApiError(
            404,
            "unknown_schedule",
            f"app {app!r} has no schedule {name!r} in its current release (it has: {names})",
        )
    return declared[name]


async def set_paused(state: ApiState, app: str, name: str, paused: bool, by: str) -> dict[str, Any]:
    spec = await _spec(state, app, name)

    def change(got: ScheduleState) -> None:
        got.paused, got.changed_by, got.changed_at = paused, by, now()

    return _view(app, name, spec, await _update(state.resources.store, app, name, change))


async def fire(state: ApiState, broker: Broker, app: str, name: str, tick: int) -> dict[str, Any]:
    """Run the schedule for `tick` (once, however often asked): its invocation, stored durably."""
    spec = await _spec(state, app, name)
    spec_json = spec.model_dump(mode="json")
    if tick > time.time() + FUTURE_S:
        raise ApiError(409, "tick_ahead", f"tick {tick} is still to come (the API's clock says {now()})")
    try:
        real = schedules.last_tick(spec_json, tick) == tick
    except ValueError as e:
        raise ApiError(409, "bad_schedule", str(e)) from e
    if not real:
        raise ApiError(400, "not_a_tick", f"{tick} is not a tick of schedule {app}.{name}")
    got, _ = await _state(state.resources.store, app, name)
    if got.paused:
        raise ApiError(409, "schedule_paused", f"schedule {app}.{name} is paused; `osless schedule resume`")
    event = json.dumps({"schedule": name, "tick": tick}).encode()
    found, _ = await invocations.submit(broker, app, name, event, f"sched:{name}:{tick}")

    def record(got: ScheduleState) -> None:
        if any(r.tick == tick for r in got.runs):
            return
        got.last_tick = max(got.last_tick or tick, tick)
        got.runs = sorted([*got.runs, Run(tick=tick, id=found["id"], fired_at=now())], key=lambda r: r.tick)[
            -MAX_RUNS:
        ]

    await _update(state.resources.store, app, name, record)
    return found


async def history(state: ApiState, broker: Broker, app: str, name: str) -> list[dict[str, Any]]:
    """The schedule's recent runs, newest first, with their outcome and duration (from the invocations'
    states, kept 24 h: an older run's outcome is `unknown`)."""
    got, _ = await _state(state.resources.store, app, name)
    if not got.runs:
        await _spec(state, app, name)  # a 404 for a name that is no schedule at all
    out = []
    for run in reversed(got.runs):
        try:
            inv = await invocations.get_invocation(broker, run.id)
        except ApiError as e:
            if e.status != 404:
                raise
            inv = {}
        started, finished = inv.get("started_at"), inv.get("finished_at")
        out.append(
            {
                "tick": run.tick,
                "id": run.id,
                "fired_at": run.fired_at,
                "state": inv.get("state", "unknown"),
                "attempts": inv.get("attempts"),
                "started_at": started,
                "duration_s": round(finished - started, 3) if started and finished else None,
                "error": (inv.get("error") or {}).get("code"),
            }
        )
    return out
