"""Traces (issue 14): the gateway starts or continues a W3C traceparent, instances make OpenTelemetry
spans for each request, invocation and app-to-app call, `osless traces` reads them from the nodes,
and an app that sets OTEL_EXPORTER_OTLP_ENDPOINT sends them by OTLP through its egress."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from osless.node.traces import SpanStore
from osless.sdk import traceparent
from osless.spans import check_span
from tests.conftest import COLLECTOR_HOST
from tests.platform import Platform, copy_app

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def spanapps(platform: Platform) -> None:
    platform.deploy_warm(APPS / "spanback")
    platform.deploy_warm(APPS / "spanfront")
    platform.cli("functions", "allow", "spanback.work", "--app", "spanfront")


def _client_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _get(platform: Platform, path: str, traceparent: str | None = None) -> dict[str, Any]:
    headers = {"traceparent": traceparent} if traceparent is not None else {}
    r = httpx.get(f"{platform.gateway}/spanfront{path}", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()
    return got


def _spans(platform: Platform, app: str, trace_id: str, count: int) -> list[dict[str, Any]]:
    """The spans `osless traces APP --trace ID --json` shows, once there are `count` of them."""

    def found() -> list[dict[str, Any]] | None:
        traces = platform.cli_json("traces", app, "--trace", trace_id)["traces"]
        spans: list[dict[str, Any]] = traces[0]["spans"] if traces else []
        return spans if len(spans) >= count else None

    spans: list[dict[str, Any]] = platform.wait_for(found, 20, f"{count} spans of {trace_id} in {app}")
    return spans


def test_a_request_with_a_traceparent_keeps_its_trace_id(platform: Platform, spanapps: None) -> None:
    header, trace_id, parent = _client_traceparent()
    assert _get(platform, "/", header)["traceparent"] == header  # passed on as the client sent it
    [span] = _spans(platform, "spanfront", trace_id, 1)
    assert span["parent_id"] == parent and span["kind"] == "server"
    assert span["name"] == "GET /spanfront/" and span["attributes"]["http.response.status_code"] == 200
    assert span["app"] == "spanfront" and span["instance"]


def test_a_request_without_a_traceparent_gets_one(platform: Platform, spanapps: None) -> None:
    given = _get(platform, "/")["traceparent"]
    version, trace_id, parent, flags = given.split("-")
    assert (version, flags) == ("00", "01") and len(trace_id) == 32 and len(parent) == 16
    [span] = _spans(platform, "spanfront", trace_id, 1)
    assert span["parent_id"] == parent
    listed = platform.cli("traces", "spanfront").stdout
    assert trace_id in listed and "GET /spanfront/" in listed


def test_a_trace_not_sampled_goes_on_unrecorded_across_apps(platform: Platform, spanapps: None) -> None:
    """A traceparent whose `sampled` flag is off is continued, to the app it calls too, and no span of
    it is made: the cost of a span is only paid for the traces the gateway (or a client) samples."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    header = f"00-{trace_id}-{span_id}-00"
    got = _get(platform, "/call", header)
    assert got["traceparent"] == header and got["result"] == {"doubled": 4}
    marker, marker_id, _ = _client_traceparent()  # recorded after it: its spans are in by then
    _get(platform, "/call", marker)
    _spans(platform, "spanback", marker_id, 1)
    for app in ("spanfront", "spanback"):
        assert platform.cli_json("traces", app, "--trace", trace_id)["traces"] == []


def test_the_gateway_samples_the_first_trace_of_each_second_and_a_share_of_the_rest() -> None:
    now = [100.2]
    never = traceparent.Sampler(0.0, clock=lambda: now[0])
    assert [never() for _ in range(3)] == [True, False, False]
    now[0] = 101.0
    assert never() is True
    always = traceparent.Sampler(1.0, clock=lambda: now[0])
    assert all(always() for _ in range(5))
    some = traceparent.Sampler(0.25, clock=lambda: now[0])
    some()
    share = sum(some() for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3, share
    with pytest.raises(ValueError):
        traceparent.Sampler(1.5)
    assert traceparent.new(False).endswith(b"-00") and traceparent.new().endswith(b"-01")
    assert traceparent.sampled("00-" + "a" * 32 + "-" + "1" * 16 + "-01")
    assert not traceparent.sampled("00-" + "a" * 32 + "-" + "1" * 16 + "-00")


def test_only_a_traceparent_in_its_exact_form_is_valid() -> None:
    good = b"00-" + b"a" * 32 + b"-" + b"1" * 16 + b"-01"
    assert traceparent.valid(good) and traceparent.child(good) == good
    for bad in (
        b"",
        good[:-1],
        good + b"0",
        good + b"\n",
        b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01",  # an all-zero trace id
        b"00-" + b"a" * 32 + b"-" + b"0" * 16 + b"-01",  # an all-zero parent id
        good.upper(),
        b"01" + good[2:],
        good.replace(b"-", b"_"),
    ):
        assert not traceparent.valid(bad), bad
        assert traceparent.child(bad) != bad and traceparent.valid(traceparent.child(bad))


def test_new_traces_read_the_kernel_once_for_many_and_a_fork_makes_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway starts a trace for every request: a read of the CSPRNG each was a system call each.
    reads: list[int] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", urandom)
    made = [traceparent.new(i % 2 == 0) for i in range(100)]
    assert len(reads) <= 1 and all(traceparent.valid(t) for t in made)
    assert len({t[:-3] for t in made}) == 100
    # A forked child (an instance's, a zygote's) hands out ids of its own, never its parent's next.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, traceparent.new())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100)
    os.close(r)
    assert traceparent.valid(child) and child[:-3] != traceparent.new()[:-3]


def test_spans_are_written_together_whole_lines_a_pipe_buffer_at_a_time() -> None:
    # A write per span cost a sampled request a system call in the instance and a wakeup of the node.
    from opentelemetry.sdk.trace import TracerProvider

    from osless.runtime import tracing

    ours, node = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # each write one message
    ours.setblocking(False)
    node.setblocking(False)
    provider = TracerProvider()
    provider.add_span_processor(tracing._deferred(tracing._PipeExporter(ours.fileno())))
    tracer = provider.get_tracer("test")

    async def requests() -> None:
        for i in range(30):
            with tracer.start_as_current_span(f"GET /{i}", attributes={"a": "x" * 200}):
                pass
            await asyncio.sleep(0)  # the loop turns, as between requests
        with pytest.raises(BlockingIOError):
            node.recv(select.PIPE_BUF)  # nothing written yet: the spans wait for others
        await asyncio.sleep(tracing.FLUSH_S + 0.2)

    try:
        asyncio.run(requests())
        writes = []
        with contextlib.suppress(BlockingIOError):
            while True:
                writes.append(node.recv(2 * select.PIPE_BUF))
        lines = [line for w in writes for line in w.decode().splitlines()]
        assert len(lines) == 30 and all(check_span(line) is not None for line in lines)
        assert 2 <= len(writes) < 10, len(writes)
        assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
    finally:
        provider.shutdown()
        ours.close()
        node.close()


@pytest.mark.parametrize(
    "bad",
    [
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id
        "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # uppercase
        "01-" + "a" * 32 + "-" + "1" * 16 + "-01",  # a version this platform does not continue
        "00-" + "a" * 32 + "-" + "1" * 16 + "-01-extra",
        "garbage",
    ],
)
def test_a_malformed_traceparent_is_replaced(platform: Platform, spanapps: None, bad: str) -> None:
    given = _get(platform, "/", bad)["traceparent"]
    assert given != bad
    _, trace_id, _, _ = given.split("-")
    assert trace_id not in bad and len(trace_id) == 32 and trace_id != "0" * 32


def test_an_app_to_app_call_is_one_trace_with_parent_links(platform: Platform, spanapps: None) -> None:
    header, trace_id, parent = _client_traceparent()
    assert _get(platform, "/call", header)["result"] == {"doubled": 4}
    [back] = _spans(platform, "spanback", trace_id, 1)
    assert back["trace_id"] == trace_id and back["name"] == "invoke work" and back["kind"] == "server"
    # The caller's app's trace takes in the spans of the apps its calls reached.
    spans = _spans(platform, "spanfront", trace_id, 3)
    front = {s["kind"]: s for s in spans if s["app"] == "spanfront"}
    assert front["server"]["parent_id"] == parent
    assert front["client"]["parent_id"] == front["server"]["span_id"]
    assert front["client"]["name"] == "call spanback.work"
    assert back["parent_id"] == front["client"]["span_id"]
    assert {s["trace_id"] for s in spans} == {trace_id}
    # As a person reads it: a tree with durations.
    tree = platform.cli("traces", "spanfront", "--trace", trace_id).stdout.splitlines()
    assert tree[0].startswith("GET /spanfront/call  ") and " ms  [spanfront " in tree[0]
    assert tree[1].startswith("  call spanback.work  ")
    assert tree[2].startswith("    invoke work  ") and "[spanback " in tree[2]


def test_an_async_invocation_runs_in_its_callers_trace(platform: Platform, spanapps: None) -> None:
    header, trace_id, parent = _client_traceparent()
    r = platform.http(
        "POST",
        "/v1/apps/spanback/functions/work:invoke",
        json={"n": 1},
        headers={"traceparent": header, "x-osless-invocation-type": "Event"},
    )
    assert r.status_code == 202, r.text
    [span] = _spans(platform, "spanback", trace_id, 1)
    assert span["parent_id"] == parent and span["name"] == "invoke work"


def test_traces_refuses_a_bad_trace_id(platform: Platform, spanapps: None) -> None:
    r = platform.cli("traces", "spanfront", "--trace", "nope", "--json", check=False)
    assert r.returncode != 0 and json.loads(r.stdout)["error"]["code"] == "invalid_trace"
    api = platform.http("GET", "/v1/apps/spanfront/traces", params={"trace": "X" * 32})
    assert api.status_code == 422 and api.json()["error"]["code"] == "invalid_request"


class _Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__((COLLECTOR_HOST, 0), _Receive)
        self.requests: list[ExportTraceServiceRequest] = []


class _Receive(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            self.server.requests.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_spans_reach_an_otlp_collector_when_the_app_names_one(
    platform: Platform, collector: _Collector, tmp_path: Path
) -> None:
    app = copy_app(APPS / "spanotlp", tmp_path / "spanotlp")
    (app / "collector.txt").write_text(f"http://{COLLECTOR_HOST}:{collector.server_address[1]}")
    platform.deploy(app)
    header, trace_id, parent = _client_traceparent()
    # Through the API, which passes the caller's traceparent on to the gateway.
    r = platform.http("POST", "/v1/apps/spanotlp/functions/hello:invoke", headers={"traceparent": header})
    assert r.status_code == 200, r.text

    def exported() -> list[Any]:
        return [
            span
            for request in list(collector.requests)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
            if span.trace_id.hex() == trace_id
        ]

    [span] = platform.wait_for(exported, 20, "the span at the collector")
    assert span.parent_span_id.hex() == parent and span.name == "invoke hello"
    services = {
        a.value.string_value
        for request in collector.requests
        for resource in request.resource_spans
        for a in resource.resource.attributes
        if a.key == "service.name"
    }
    assert services == {"spanotlp"}


def _line(trace_id: str = "a" * 32, **changes: Any) -> str:
    rec: dict[str, Any] = {
        "trace_id": trace_id,
        "span_id": secrets.token_hex(8),
        "parent_id": None,
        "name": "GET /",
        "kind": "server",
        "start": 1.0,
        "end": 2.0,
        "status": "ok",
        "attributes": {"a": 1},
    }
    rec.update(changes)
    return json.dumps(rec)


def test_what_an_app_writes_as_spans_is_checked_and_bounded() -> None:
    # The instance writes its spans: the node keeps only well-formed ones, capped, in a bounded window.
    for bad in [
        "not json",
        "[1]",
        _line(trace_id="A" * 32),
        _line(span_id="x"),
        _line(parent_id=7),
        _line(start=float("nan")),
        _line(start=3.0, end=2.0),
        _line(start=True),
    ]:
        assert check_span(bad) is None, bad
    odd = check_span(
        _line(name="n" * 10_000, kind="weird", status=None, attributes={str(i): "v" * 999 for i in range(99)})
    )
    assert (
        odd is not None and len(odd["name"]) == 256 and odd["kind"] == "internal" and odd["status"] == "unset"
    )
    assert len(odd["attributes"]) == 32 and all(len(v) == 256 for v in odd["attributes"].values())
    store = SpanStore(per_app=5, per_app_bytes=10_000, max_apps=2)
    for i in range(8):
        store.add("a", "a-1", _line(trace_id=f"{i:032x}"))
    assert [s["trace_id"] for s in store.spans("a")] == [f"{i:032x}" for i in range(3, 8)]
    assert store.spans("a", f"{7:032x}")[0]["instance"] == "a-1"
    store.add("a", "a-1", _line(name="x" * 3000))
    store.add("a", "a-1", _line(name="y" * 3000))
    store.add("a", "a-1", _line(name="z" * 3000))  # past the bytes: the oldest go
    assert sum(len(json.dumps(s)) for s in store.spans("a")) < 10_000
    store.add("b", "b-1", _line())
    store.add("c", "c-1", _line())  # a third app: the one fed least recently goes
    assert store.spans("a") == [] and len(store.spans("c")) == 1
    store.add("a", "a-1", "garbage")
    assert store.dropped == 1


def test_spans_are_dated_by_the_node_not_by_what_the_app_says() -> None:
    # An app deleted could otherwise leave spans dated years ahead, shown to a new app of its name:
    # the node API passes `since` the app's creation, which its own read time is compared with.
    store = SpanStore()
    store.add("a", "a-1", _line(start=4e10, end=4e10 + 1, name="left by the app deleted"))
    born = time.time() + 0.001
    time.sleep(0.01)
    store.add("a", "a-2", _line(name="the new app's"))
    assert [s["name"] for s in store.spans("a", since=born)] == ["the new app's"]
    assert len(store.spans("a")) == 2
