"""The API's `GET /metrics` (Prometheus text, prometheus-client): the platform as the store holds it,
and the API's own health.

- instances by app and phase, over every node; nodes live; apps; builds queued and running;
- async invocations: the backlog waiting for the dispatcher, and messages in the dead-letter
  queue (`api.broker`'s streams, asked of the message engine at each scrape);
- the store: each operation's latency and failures (`TimedStore`, in front of the store the API's
  resources use), so a slow etcd shows here first; and the watch lag: from a write this API made
  being acknowledged to the first of this API's watches seeing it (what every watcher of the API,
  gateways and nodes, waits on top of its own connection).

Requests, latency and cold starts per app are counted where they happen, on the nodes (each
node's own `/metrics`, `node.metrics`): a scraper scrapes the API and every node (`GET
/v1/nodes` lists their node API's URL).
"""

from __future__ import annotations

import builtins
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from osless.store import Event, KeyValue, Store

if TYPE_CHECKING:
    from osless.api.state import ApiState

__all__ = ["CONTENT_TYPE", "ApiMetrics", "TimedStore", "scrape"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WRITES_REMEMBERED = 4096  # revisions of this API's own writes, waiting for a watch to see them
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ApiMetrics:
    """The API process's own counters, in a registry of its own (one process may host several APIs
    in tests; prometheus-client's global registry would mix them)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.store_seconds = PromHistogram(
            "osless_store_operation_duration_seconds",
            "Time of each store operation the API made, by operation",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = PromCounter(
            "osless_store_errors",
            "Store operations that failed, by operation",
            ["op"],
            registry=self.registry,
        )
        self.watch_lag = PromHistogram(
            "osless_store_watch_lag_seconds",
            "From a write of this API's acknowledged to the first of its watches seeing it",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )


class TimedStore:
    """A `Store` whose reads and writes are timed into `ApiMetrics` (watches and leases pass on)."""

    def __init__(self, store: Store, metrics: ApiMetrics) -> None:
        self.inner = store
        self._seconds = {
            op: metrics.store_seconds.labels(op) for op in ("get", "list", "put", "delete", "txn")
        }
        self._errors = {op: metrics.store_errors.labels(op) for op in self._seconds}
        self._lag = metrics.watch_lag
        self._written: dict[int, float] = {}  # revision -> when its write was acknowledged
        # revisions a watch saw before their write was acknowledged (SQLite tells its watchers
        # within the write): a lag of 0
        self._seen: dict[int, float] = {}

    def _wrote(self, revision: int) -> None:
        if self._seen.pop(revision, None) is not None:
            self._lag.observe(0.0)
            return
        _remember(self._written, revision)

    def _saw(self, revision: int) -> None:
        written = self._written.pop(revision, None)
        if written is not None:
            self._lag.observe(time.perf_counter() - written)
        elif revision not in self._seen:
            _remember(self._seen, revision)

    def _done(self, op: str, began: float, ok: bool) -> None:
        self._seconds[op].observe(time.perf_counter() - began)
        if not ok:
            self._errors[op].inc()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def get(self, key: str) -> KeyValue | None:
        began, ok = time.perf_counter(), False
        try:
            found = await self.inner.get(key)
            ok = True
            return found
        finally:
            self._done("get", began, ok)

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        began, ok = time.perf_counter(), False
        try:
            found = await self.inner.list(prefix)
            ok = True
            return found
        finally:
            self._done("list", began, ok)

    async def put(
        self, key: str, value: bytes, *, if_revision: int | None = None, lease: int | None = None
    ) -> KeyValue:
        began, ok = time.perf_counter(), False
        try:
            # A conflict is an answer, not a failure of the store: counted as done.
            kv = await self.inner.put(key, value, if_revision=if_revision, lease=lease)
            ok = True
            self._wrote(kv.mod_revision)
            return kv
        finally:
            self._done("put", began, ok)

    async def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        began, ok = time.perf_counter(), False
        try:
            gone = await self.inner.delete(key, if_revision=if_revision)
            ok = True
            return gone
        finally:
            self._done("delete", began, ok)

    async def txn_put_many(self, puts: builtins.list[tuple[str, bytes, int | None]]) -> int:
        began, ok = time.perf_counter(), False
        try:
            rev = await self.inner.txn_put_many(puts)
            ok = True
            self._wrote(rev)
            return rev
        finally:
            self._done("txn", began, ok)

    async def txn(
        self,
        *,
        puts: builtins.list[tuple[str, bytes, int | None]] | None = None,
        deletes: builtins.list[tuple[str, int | None]] | None = None,
        delete_prefixes: builtins.list[str] | None = None,
        checks: builtins.list[tuple[str, int]] | None = None,
    ) -> int:
        began, ok = time.perf_counter(), False
        try:
            rev = await self.inner.txn(
                puts=puts, deletes=deletes, delete_prefixes=delete_prefixes, checks=checks
            )
            ok = True
            self._wrote(rev)
            return rev
        finally:
            self._done("txn", began, ok)

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[Event]:
        async with contextlib.aclosing(self.inner.watch(prefix, after_revision=after_revision)) as events:  # type: ignore[type-var]
            async for event in events:
                self._saw(event.revision)
                yield event

    async def revision(self) -> int:
        return await self.inner.revision()

    async def grant_lease(self, ttl_s: float) -> int:
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease_id: int) -> None:
        await self.inner.keepalive(lease_id)

    async def revoke(self, lease_id: int) -> None:
        await self.inner.revoke(lease_id)


def _remember(table: dict[int, float], revision: int) -> None:
    if len(table) >= WRITES_REMEMBERED:  # revisions no watch (or no write of ours) matched: the oldest go
        table.pop(next(iter(table)))
    table[revision] = time.perf_counter()


class _Now(Collector):
    """What one scrape read of the store and the message engine."""

    def __init__(self, families: builtins.list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def scrape(state: ApiState) -> bytes:
    """One scrape's text."""
    res = state.resources
    apps, _ = await res.list_apps()
    instances, _ = await res.list_instances()
    nodes, _ = await res.list_nodes()
    deploys, _ = await res.list_deploys()
    families: builtins.list[Metric] = []
    by_phase = Counter((i.app, i.status.phase) for i in instances)
    family = GaugeMetricFamily(
        "osless_instances", "Instances by app and phase, over every node", labels=["app", "phase"]
    )
    for (app, phase), n in sorted(by_phase.items()):
        family.add_metric([app, phase], n)
    families.append(family)
    families.append(GaugeMetricFamily("osless_nodes", "Nodes whose lease is live", value=len(nodes)))
    families.append(GaugeMetricFamily("osless_apps", "Apps", value=len(apps)))
    builds = GaugeMetricFamily("osless_builds", "Deploys queued or building", labels=["status"])
    for status in ("queued", "building"):
        builds.add_metric([status], sum(d.status == status for d in deploys))
    families.append(builds)
    families += await _queues(state)
    return generate_latest(_registry(state, families))


def _registry(state: ApiState, families: builtins.list[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Now(families))
    registry.register(_Of(state.metrics.registry))
    return registry


class _Of(Collector):
    """Another registry's metrics, in this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


async def _queues(state: ApiState) -> builtins.list[Metric]:
    """The async invocations' backlog and dead letters, and the queues' depth and dead letters, from
    the message engine (none if it is not connected: the gauges are left out rather than said to be 0)."""
    from osless.api.broker import DLQ_STREAM, INVOKE_STREAM, QUEUE_STREAM

    broker = state.broker
    if broker is None or broker.js is None:
        return []
    try:
        # Per subject (`osless.invoke.{app}.{function}`): the engine counts them; apps and functions
        # are bounded by what is deployed, and a done one leaves the work queue.
        invoke = await broker.js.stream_info(INVOKE_STREAM, subjects_filter="osless.invoke.>")
        dlq = await broker.js.stream_info(DLQ_STREAM, subjects_filter="osless.dlq.>")
        # Queues (`osless.queue.{app}.{queue}`) and their dead letters: bounded by what is deployed too.
        queued = await broker.js.stream_info(QUEUE_STREAM, subjects_filter="osless.queue.>")
        qdlq = await broker.js.stream_info(DLQ_STREAM, subjects_filter="osless.qdlq.>")
    except Exception:  # the engine is away: its gauges wait for the next scrape
        return []
    out: builtins.list[Metric] = []
    for info, name, what, label in (
        (invoke, "osless_invocations_backlog", "Async invocations accepted and not yet done", "function"),
        (dlq, "osless_invocations_dead_letters", "Async invocations in the dead-letter queue", "function"),
        (queued, "osless_queue_messages", "Messages waiting in a queue (or being handled)", "queue"),
        (qdlq, "osless_queue_dead_letters", "Messages in a queue's dead-letter queue", "queue"),
    ):
        family = GaugeMetricFamily(name, what, labels=["app", label])
        for subject, n in sorted((info.state.subjects or {}).items()):
            parts = subject.split(".")
            if len(parts) == 4:
                family.add_metric([parts[2], parts[3]], n)
        out.append(family)
    return out
