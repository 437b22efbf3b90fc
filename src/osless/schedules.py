"""Schedules' ticks: when a cron expression (in its time zone) or a fixed interval fires.

Shared by the builder (which refuses a bad expression or zone at deploy), the API (which checks a
tick it is asked to fire) and the controllers (which fire them). Not by instances: `croniter` is the
host's, never in an app's sandbox. A tick is a whole second since the epoch: the same on every
server, so a tick fired twice (a leader change mid-tick) is recognised as one.

An interval's ticks are the multiples of it since the epoch (UTC): `every=300` fires at :00, :05, ...
wherever and whenever it was deployed.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["MAX_CRON_CHARS", "MAX_EVERY_S", "check", "last_tick", "next_tick"]

MAX_CRON_CHARS = 200
MAX_EVERY_S = 31 * 24 * 3600


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {tz[:64]!r}: give an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


def check(name: str, spec: Mapping[str, Any]) -> None:
    """ValueError saying what is wrong with schedule `name`'s spec (as in a manifest)."""
    from croniter import croniter  # the host's only

    cron, every, tz = spec.get("cron"), spec.get("every_s"), spec.get("tz", "UTC")
    if (cron is None) == (every is None):
        raise ValueError(f"schedule {name!r} needs exactly one of a cron expression and every=")
    if not isinstance(tz, str):
        raise ValueError(f"schedule {name!r}: tz is a time zone's name")
    _zone(tz)
    if cron is not None:
        if not isinstance(cron, str) or len(cron) > MAX_CRON_CHARS:
            raise ValueError(f"schedule {name!r}: a cron expression is text of at most {MAX_CRON_CHARS}")
        fields = len(cron.split())
        if fields not in (5, 6) or not croniter.is_valid(cron):
            raise ValueError(
                f"schedule {name!r}: {cron[:60]!r} is not a cron expression: give 5 fields "
                "(minute hour day month weekday, e.g. '*/5 * * * *') or 6 (a last one for seconds)"
            )
    elif isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= MAX_EVERY_S:
        raise ValueError(f"schedule {name!r}: every is a whole number of seconds, 1 to {MAX_EVERY_S}")


def last_tick(spec: Mapping[str, Any], now: float) -> int:
    """The latest tick at or before `now`."""
    every = spec.get("every_s")
    if every is not None:
        return int(math.floor(now / every) * every)
    return _cron(spec, now, forward=False)


def next_tick(spec: Mapping[str, Any], now: float) -> int:
    """The first tick strictly after `now`."""
    every = spec.get("every_s")
    if every is not None:
        return int((math.floor(now / every) + 1) * every)
    return _cron(spec, now, forward=True)


def _cron(spec: Mapping[str, Any], now: float, *, forward: bool) -> int:
    from croniter import croniter

    zone = _zone(str(spec.get("tz", "UTC")))
    start = datetime.datetime.fromtimestamp(math.floor(now), zone)
    it = croniter(str(spec["cron"]), start)
    if forward:
        return int(it.get_next(float))
    # croniter's get_prev is strictly before `start`: `start` itself may be a tick
    here = math.floor(now)
    if croniter.match(str(spec["cron"]), start):
        return here
    return int(it.get_prev(float))
