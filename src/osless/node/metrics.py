"""The node's `GET /metrics` (Prometheus text, made by prometheus-client on each scrape).

What it shows, per app (and function: `web` for web requests), with no path or id in a label:
- requests answered by the node's gateway processes, by status class, and their latency (fixed
  buckets), summed over the processes (`gateway.pool`, `gateway.metrics`); requests in flight;
- instances by phase, cold starts and their time (fork asked to `ready`), from the supervisors;
- memory in use and CPU seconds, from the instances' cgroups (the kernel's accounting): CPU of runs
  that ended is kept by the `Meter`, so the counter only grows;
- the gateway's own health: processes up, their restarts, client connections open.

Nothing is counted on a scrape's behalf: it reads what the parts keep anyway. An app no longer
deployed leaves the figures (the gateways' routing table says which are).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from osless.metering import BUCKETS

if TYPE_CHECKING:
    from osless.gateway.metrics import Figures
    from osless.gateway.pool import GatewayPool
    from osless.node.supervisor import Supervisor

__all__ = ["COLD_START_BUCKETS", "Meter", "NodeCollector", "render"]

COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Meter:
    """What the node's instances did that outlives them: starts and their times, CPU of runs gone."""

    def __init__(self) -> None:
        self.starts: dict[str, list[int]] = {}  # app -> start counts per bucket (last: past all)
        self.start_seconds: dict[str, float] = {}
        self.cpu_ended: dict[str, float] = {}

    def started(self, app: str, seconds: float) -> None:
        """An instance of `app` became ready `seconds` after it was asked for."""
        buckets = self.starts.get(app)
        if buckets is None:
            buckets = self.starts[app] = [0] * (len(COLD_START_BUCKETS) + 1)
        buckets[bisect.bisect_left(COLD_START_BUCKETS, seconds)] += 1
        self.start_seconds[app] = self.start_seconds.get(app, 0.0) + seconds

    def ended(self, app: str, cpu_seconds: float) -> None:
        """A run of `app` ended having used `cpu_seconds`."""
        self.cpu_ended[app] = self.cpu_ended.get(app, 0.0) + cpu_seconds

    def forget(self, keep: Iterable[str]) -> None:
        """Drop apps not in `keep` (deleted)."""
        keep = set(keep)
        for table in (self.starts, self.start_seconds, self.cpu_ended):
            for app in [a for a in table if a not in keep]:
                del table[app]


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, seen = [], 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        seen += n
        out.append((bound, float(seen)))
    return out


class NodeCollector(Collector):
    """The node's figures, read at each scrape."""

    def __init__(
        self, pool: GatewayPool, supervisors: Mapping[str, Supervisor], meter: Meter, node: str
    ) -> None:
        self.pool = pool
        self.supervisors = supervisors
        self.meter = meter
        self.node = node

    def collect(self) -> Iterator[Metric]:
        figures = self.pool.figures()
        yield from self._requests(figures)
        deployed = figures.apps | {sup.app for sup in self.supervisors.values()}
        if figures.apps:  # else no gateway has said yet: keep everything
            self.meter.forget(deployed)
        yield from self._instances()
        gw = GaugeMetricFamily("osless_gateway_processes", "Gateway processes running on the node")
        gw.add_metric([], sum(1 for slot in self.pool.slots if slot.proc is not None))
        yield gw
        restarts = CounterMetricFamily(
            "osless_gateway_restarts", "Gateway processes started again after dying"
        )
        restarts.add_metric([], sum(slot.restarts for slot in self.pool.slots))
        yield restarts
        conns = GaugeMetricFamily(
            "osless_gateway_connections", "Client connections open on the node's gateway"
        )
        conns.add_metric([], figures.connections)
        yield conns

    def _requests(self, figures: Figures) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "osless_requests",
            "Requests answered through the gateway, by app, function (web: web requests) and status class",
            labels=["app", "function", "code"],
        )
        latency = HistogramMetricFamily(
            "osless_request_duration_seconds",
            "Time from the gateway sending a request to an instance to the end of its answer",
            labels=["app", "function"],
        )
        for (app, fn), s in sorted(figures.series.items()):
            for k, n in enumerate(s.codes):
                if n:
                    requests.add_metric([app, fn, f"{k + 1}xx"], n)
            latency.add_metric([app, fn], _cumulative(BUCKETS, s.buckets), s.total)
        yield requests
        yield latency
        in_flight = GaugeMetricFamily(
            "osless_requests_in_flight", "Requests an instance is answering", labels=["app"]
        )
        for app, n in sorted(figures.in_flight.items()):
            in_flight.add_metric([app], n)
        yield in_flight

    def _instances(self) -> Iterator[Metric]:
        phases: dict[tuple[str, str], int] = {}
        cpu: dict[str, float] = dict(self.meter.cpu_ended)
        memory: dict[str, int] = {}
        for sup in list(self.supervisors.values()):
            key = (sup.app, str(sup.status.get("phase")))
            phases[key] = phases.get(key, 0) + 1
            used_cpu, used_memory = sup.usage()
            cpu[sup.app] = cpu.get(sup.app, 0.0) + used_cpu
            memory[sup.app] = memory.get(sup.app, 0) + used_memory
        instances = GaugeMetricFamily(
            "osless_instances", "Instances on the node by phase", labels=["app", "phase"]
        )
        for (app, phase), n in sorted(phases.items()):
            instances.add_metric([app, phase], n)
        yield instances
        starts = HistogramMetricFamily(
            "osless_cold_start_seconds",
            "Instance starts: from the fork asked to the instance ready",
            labels=["app"],
        )
        for app, counts in sorted(self.meter.starts.items()):
            starts.add_metric([app], _cumulative(COLD_START_BUCKETS, counts), self.meter.start_seconds[app])
        yield starts
        cpu_family = CounterMetricFamily(
            "osless_cpu_seconds",
            "CPU time of the app's instances on the node (cgroup accounting)",
            labels=["app"],
        )
        for app, seconds in sorted(cpu.items()):
            cpu_family.add_metric([app], seconds)
        yield cpu_family
        mem = GaugeMetricFamily(
            "osless_memory_bytes",
            "Memory the app's instances on the node use now (cgroup accounting)",
            labels=["app"],
        )
        for app, used in sorted(memory.items()):
            mem.add_metric([app], used)
        yield mem


def render(*collectors: Collector) -> bytes:
    """One scrape's text."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)
