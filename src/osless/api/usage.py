"""Usage (`osless usage`) and the live view (`osless top`), as the nodes report them (`node.usage`).

In the store:
- `/usage/{app}/{hour}`: the app's figures for one hour (epoch seconds of its start), summed over
  nodes: per function (`web` for web requests) invocations, errors and seconds in the gateway; for
  the app, CPU seconds, GB-seconds and cold starts. Each node adds its minute in one
  compare-and-swap per app and hour, so the writes are nodes x apps per minute at most. Hours
  older than `KEEP_S` are deleted when an app's next hour starts, and all of them with the app.
- `/nodeusage/{node}`: each node's newest live view, replaced each second; `top` merges those
  younger than `FRESH_S` and deletes those older than `FORGET_S` (a node gone).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from typing import Any

from osless.api.errors import ApiError
from osless.api.resources import USAGE_PREFIX, put_of_app
from osless.metering import BUCKETS, quantile
from osless.store import Conflict, KeyValue, Store

__all__ = ["FRESH_S", "KEEP_S", "LIVE_PREFIX", "add_usage", "put_live", "read_usage", "top"]

LIVE_PREFIX = "/nodeusage/"
KEEP_S = 35 * 86400
FRESH_S = 5.0
FORGET_S = 600.0
FUNCTION_FIGURES = ("invocations", "errors", "duration_s")
APP_FIGURES = ("cpu_s", "gb_s", "cold_starts")


def _empty() -> dict[str, Any]:
    return {"functions": {}, **{k: 0.0 for k in APP_FIGURES}}


def _merge(into: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        fn = row["function"]
        if fn:
            figures = into["functions"].setdefault(fn, {k: 0.0 for k in FUNCTION_FIGURES})
            for k in FUNCTION_FIGURES:
                figures[k] += float(row.get(k, 0))
        else:
            for k in APP_FIGURES:
                into[k] += float(row.get(k, 0))


async def add_usage(store: Store, rows: list[dict[str, Any]]) -> None:
    """Add a node's rows (`node.usage.Sampler.rows`) to the apps' hourly buckets.

    Only while the app exists: its delete takes its hours (`Resources.delete_app`), and a node's
    last minute of it, arriving just after, must not bring one back for a new app of the name."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["app"], row["hour"]), []).append(row)
    for (app, hour), group in grouped.items():
        if await _add_hour(store, app, hour, group):  # its first figures of the hour: forget old hours
            items, _ = await store.list(f"{USAGE_PREFIX}{app}/")
            for old in items:
                if int(old.key.rsplit("/", 1)[1]) < hour - KEEP_S:
                    await store.delete(old.key, if_revision=old.mod_revision)


async def _add_hour(store: Store, app: str, hour: int, rows: list[dict[str, Any]]) -> bool:
    """Add `rows` to the app's `hour`, by compare-and-swap; True if that made the hour's record."""
    key = f"{USAGE_PREFIX}{app}/{hour}"
    while True:
        kv = await store.get(key)
        bucket = json.loads(kv.value) if kv is not None else _empty()
        _merge(bucket, rows)
        try:
            await put_of_app(store, app, [(key, json.dumps(bucket).encode(), kv.mod_revision if kv else 0)])
            return kv is None
        except Conflict:  # another node's minute came first: added to theirs
            continue
        except ApiError as e:
            if e.code != "app_not_found":
                raise
            return False  # the app is gone, and its hours with it


# Up to this many hours are read key by key; a longer span lists the app's hours (up to 35 days' worth).
READ_EACH_HOURS = 48


async def read_usage(
    store: Store, app: str, since: float, at: float, live: list[KeyValue] | None = None
) -> list[dict[str, Any]]:
    """The app's hours that end after `since`, oldest first: what is stored, and the minute each
    live node has not stored yet. `live`: the nodes' live views, when the caller read them already
    (a page of many apps reads them once)."""
    hours: dict[int, dict[str, Any]] = {}
    first = int(since // 3600 * 3600)
    if at - first <= READ_EACH_HOURS * 3600:  # a day's page: a few gets, not every hour the app kept
        for hour in range(first, int(at) + 1, 3600):
            if (kv := await store.get(f"{USAGE_PREFIX}{app}/{hour}")) is not None:
                hours[hour] = json.loads(kv.value)
    else:
        items, _ = await store.list(f"{USAGE_PREFIX}{app}/")
        for kv in items:
            hour = int(kv.key.rsplit("/", 1)[1])
            if hour + 3600 > since:
                hours[hour] = json.loads(kv.value)
    if live is None:
        live, _ = await store.list(LIVE_PREFIX)
    for kv in live:
        report = json.loads(kv.value)
        if report["at"] < at - FRESH_S:
            continue
        for row in report.get("pending", []):
            if row["app"] == app and row["hour"] + 3600 > since:
                _merge(hours.setdefault(row["hour"], _empty()), [row])
    return [{"hour": hour, **hours[hour]} for hour in sorted(hours)]


async def put_live(
    store: Store, node: str, at: float, now: dict[str, Any], pending: list[dict[str, Any]]
) -> None:
    """A node's newest live view, with its usage not stored yet (`pending`)."""
    await store.put(f"{LIVE_PREFIX}{node}", json.dumps({"at": at, "now": now, "pending": pending}).encode())


# A node's live figures of an app that add up over the nodes.
MERGED = (
    "requests_per_s",
    "errors_per_s",
    "client_errors_per_s",
    "in_flight",
    "cpu",
    "memory",
    "cold_starts",
)


async def top(store: Store, at: float, apps: Iterable[str]) -> dict[str, Any]:
    """The nodes' live views merged: per app, and each instance with its node."""
    merged: dict[str, dict[str, Any]] = {
        app: {
            "requests_per_s": 0.0,
            "errors_per_s": 0.0,
            "client_errors_per_s": 0.0,
            "in_flight": 0,
            "cpu": 0.0,
            "memory": 0,
            "cold_starts": 0,
            "buckets": [0] * (len(BUCKETS) + 1),
        }
        for app in apps
    }
    instances = []
    items, _ = await store.list(LIVE_PREFIX)
    for kv in items:
        report = json.loads(kv.value)
        if report["at"] < at - FORGET_S:  # a node long gone (or renamed): forgotten
            with contextlib.suppress(Conflict):
                await store.delete(kv.key, if_revision=kv.mod_revision)
        if report["at"] < at - FRESH_S:
            continue
        node = kv.key[len(LIVE_PREFIX) :]
        for app, view in report["now"].get("apps", {}).items():
            into = merged.get(app)
            if into is None:
                continue  # deleted since
            for k in MERGED:
                into[k] += view.get(k, 0)
            for i, n in enumerate(view.get("latency_buckets", [])[: len(into["buckets"])]):
                into["buckets"][i] += n
        for inst in report["now"].get("instances", []):
            if inst.get("app") in merged:
                instances.append({**inst, "node": node})
    out = {}
    for app, view in merged.items():
        buckets = view.pop("buckets")
        p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
        view["p50_ms"] = None if p50 is None else round(p50 * 1000, 2)
        view["p99_ms"] = None if p99 is None else round(p99 * 1000, 2)
        view["requests_per_s"] = round(view["requests_per_s"], 3)
        view["errors_per_s"] = round(view["errors_per_s"], 3)
        view["client_errors_per_s"] = round(view["client_errors_per_s"], 3)
        view["cpu"] = round(view["cpu"], 4)
        view["instances"] = sum(1 for i in instances if i["app"] == app)
        out[app] = view
    return {"apps": out, "instances": sorted(instances, key=lambda i: (i["app"], i["id"])), "at": at}
