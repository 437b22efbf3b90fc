"""An app's own prometheus-client metrics, served by the node under the app's name:
`GET /metrics/apps/{app}` on the node API.

Each running instance of the app on the node is asked `GET /metrics` on its control socket (the
runtime answers with the app's default registry, if the app imported prometheus-client:
`runtime.instance`), and what it says is parsed with prometheus-client's own parser and served
again with an `osless_instance` label on each sample: one exposition per app, so an app's names
never meet the platform's (`/metrics`) nor another app's.

What an instance answers is the app's: read within `TIMEOUT_S` and `MAX_BYTES`, parsed in the
node's process, in a thread off its loop, with a parser that refuses what it cannot read (that
instance is then left out and counted in `osless_app_scrape_errors`), at most `CONCURRENCY`
instances at once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from osless.node.supervisor import Supervisor

__all__ = ["scrape_app"]

TIMEOUT_S = 2.0
MAX_BYTES = 4 * 1024 * 1024
MAX_SAMPLES = 100_000  # per instance
CONCURRENCY = 16
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: instance\r\nConnection: close\r\n\r\n"
INSTANCE_LABEL = "osless_instance"
ERRORS = "osless_app_scrape_errors"


async def _read(control: str) -> str | None:
    """The instance's answer to `GET /metrics`, or None (no metrics, too big, too slow, broken)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    answer = b""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await loop.sock_connect(sock, control)
            await loop.sock_sendall(sock, REQUEST)
            while len(answer) <= MAX_BYTES:
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    break
                answer += chunk
    except (TimeoutError, OSError):
        return None
    finally:
        sock.close()
    if len(answer) > MAX_BYTES or not answer.startswith(b"HTTP/1.1 200 "):
        return None
    return answer.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def _relabelled(text: str, instance: str) -> list[Metric]:
    """The families of one instance's text, each sample labelled with the instance; ValueError
    if the text is not Prometheus' format or holds too much."""
    out = []
    samples = 0
    for family in text_string_to_metric_families(text):
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for s in family.samples:
            samples += 1
            if samples > MAX_SAMPLES:
                raise ValueError(f"more than {MAX_SAMPLES} samples")
            copy.add_sample(s.name, {**s.labels, INSTANCE_LABEL: instance}, s.value, s.timestamp, s.exemplar)
        out.append(copy)
    return out


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def scrape_app(app: str, supervisors: Mapping[str, Supervisor]) -> bytes:
    """The app's instances' metrics on this node, merged: a family named alike in two instances is
    one family with both's samples (the first's type and help)."""
    targets = [
        (iid, str(sup.status["control"]))
        for iid, sup in list(supervisors.items())
        if sup.app == app and sup.status.get("phase") == "ready" and sup.status.get("control")
    ]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(control: str) -> str | None:
        async with gate:
            return await _read(control)

    texts = await asyncio.gather(*(one(control) for _, control in targets))
    # Parsed and written again in a thread: a second or more for an app's largest answers, which on
    # the node's loop would stall its agent (health checks, heartbeats) and API for every app.
    return await asyncio.to_thread(_merged, [iid for iid, _ in targets], texts)


def _merged(instances: list[str], texts: list[str | None]) -> bytes:
    """The instances' texts (None: not read) as one exposition, with the count of those refused."""
    merged: dict[str, Metric] = {}
    errors = 0
    for iid, text in zip(instances, texts, strict=True):
        if text is None:
            continue
        try:
            families = _relabelled(text, iid)
        except Exception:  # the app's text, which the parser refused (ValueError, or worse)
            errors += 1
            continue
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = family
            elif into.type == family.type:
                into.samples += family.samples
            else:
                errors += 1  # two instances (two releases) disagree on a type: the first's kept
    merged.pop(ERRORS, None)  # the node's own name here
    failed = GaugeMetricFamily(ERRORS, "Instances whose metrics could not be read as Prometheus text")
    failed.add_metric([], errors)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), failed]))
    return generate_latest(registry)
