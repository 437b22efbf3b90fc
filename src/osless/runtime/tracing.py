"""An instance's spans (OpenTelemetry): one for each web request, each invocation and each call of
another app's function (`osless.sdk.calls`), in the trace the gateway's `traceparent` names.

Finished spans go two ways:
- to the node, as JSON lines on a pipe of their own (`OSLESS_SPANS_FD`, passed at fork), which the
  node keeps a bounded window of for `osless traces` (`node.traces`); queued, and written by the
  instance's loop FLUSH_S after the first of them ended (`_deferred`), as many whole lines to a
  write as PIPE_BUF holds (so the node wakes once for many), each write whole or not at all, never
  blocking: a full pipe (or queue) drops the spans;
- by OTLP/HTTP (`opentelemetry-exporter-otlp-proto-http`, batched on a thread of its own) when the
  app sets `OTEL_EXPORTER_OTLP_ENDPOINT` (its environment at import, or its config key
  `otel_exporter_otlp_endpoint`): through the sandbox's `HTTP_PROXY`, the node's egress proxy, so
  the collector's host must be in `App(egress=[...])`.

The SDK is imported in the release zygote after the app (`preload`), so forks pay nothing and an
app's own opentelemetry, if it has one, is the one used. The provider is made in each instance after
its fork (`start`): no exporter thread is ever forked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from osless.sdk import traceparent

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = ["SPANS_FD_ENV", "enabled", "flush", "preload", "server_span", "set_status", "start"]

SPANS_FD_ENV = "OSLESS_SPANS_FD"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENDPOINT_KEY = "otel_exporter_otlp_endpoint"
# A line is written with one write(2) of at most PIPE_BUF bytes: the kernel never splits it.
MAX_LINE = select.PIPE_BUF - 1
MAX_ATTRS = 32
MAX_TEXT = 256

MAX_PENDING = 4096  # spans waiting for the loop: past it the oldest are dropped
# How long a finished span waits for others to be written with it: one system call in the instance,
# and one wakeup of the node, for up to a PIPE_BUF of spans, where a write per span cost each a
# sampled request (`osless traces` shows a span this much later).
FLUSH_S = 0.2
FLUSH_MS = 1000  # what a stopping instance gives its last spans
# `json.dumps` with separators makes an encoder a call: one, kept, writes the same lines.
_JSON = json.JSONEncoder(separators=(",", ":"))

_tracer: Tracer | None = None
_SERVER: Any = None  # opentelemetry.trace.SpanKind.SERVER, once the SDK is imported (`start`)
_provider: TracerProvider | None = None
_resource: Resource | None = None  # the app's, made by the zygote


def preload(app: str) -> None:
    """Import the SDK and describe the app (in the zygote, after the app: forks inherit both). The
    description reads the resource detectors' entry points: ~30 ms, which no fork should pay."""
    global _resource
    try:
        import opentelemetry.sdk.trace.export
        import opentelemetry.trace.propagation.tracecontext
        from opentelemetry.sdk.resources import Resource

        _resource = Resource.create({"service.name": app})
        # A tracer made here, thrown away: its first one compiles the SDK's warning filters' patterns
        # (re's cache, which forks inherit) and takes its code's first steps, ~1 ms off each start.
        from opentelemetry.sdk.trace import TracerProvider

        _provider_class(TracerProvider)(resource=_resource).get_tracer("osless")
        if os.environ.get(ENDPOINT_ENV):  # set by the app as it was imported: its forks export
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except Exception as e:  # an app's own opentelemetry, broken: its instances run untraced
        print(f"osless: spans are off: {e}", file=sys.stderr, flush=True)


def start(app: str, instance: str, endpoint_from_config: str | None = None) -> None:
    """Make this instance's tracer provider; once, after the fork. Nothing to do: no spans are made."""
    global _tracer, _provider, _SERVER
    fd = os.environ.get(SPANS_FD_ENV, "")
    endpoint = os.environ.get(ENDPOINT_ENV) or endpoint_from_config
    if not fd.isdigit() and not endpoint:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        print(f"osless: no spans from this instance: {e}", file=sys.stderr, flush=True)
        return
    base = _resource if _resource is not None else Resource.create({"service.name": app})
    provider = _provider_class(TracerProvider)(
        resource=base.merge(Resource({"service.instance.id": instance}))
    )
    if fd.isdigit():
        try:
            os.set_blocking(int(fd), False)  # a full pipe drops a span, never stalls the app
        except OSError as e:
            print(f"osless: no span pipe ({SPANS_FD_ENV}={fd}): {e}", file=sys.stderr, flush=True)
        else:
            provider.add_span_processor(_deferred(_PipeExporter(int(fd))))
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=_traces_url(endpoint))
        except Exception as e:  # a missing package or a bad endpoint: said, and the rest goes on
            print(f"osless: no OTLP export of spans: {e}", file=sys.stderr, flush=True)
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    _SERVER = trace.SpanKind.SERVER
    _tracer = provider.get_tracer("osless")
    _provider = provider


def _provider_class(base: type[TracerProvider]) -> type[TracerProvider]:
    """The SDK's provider, but for what it does in each child the app forks: the SDK runs its resource
    detectors again there, on a thread pool of their own: a thread and their memory in every child,
    against the instance's pids and memory limits (a fork bomb was OOM-killed before its pids limit).
    A forked child is part of its instance: its resource stays the instance's."""

    class Provider(base):  # type: ignore[valid-type,misc]  # a class made at run time, after the import
        def _handle_fork(self) -> None:
            self._tracers_lock = threading.Lock()

    return Provider


def flush() -> None:
    """Send what is queued: an instance ends with os._exit, which runs no atexit hook of the SDK's."""
    if _provider is not None:
        with contextlib.suppress(Exception):
            _provider.force_flush(FLUSH_MS)


def _deferred(exporter: _PipeExporter) -> SpanProcessor:
    """A span processor that queues each finished span and writes the queue from the instance's event
    loop, FLUSH_S after the first span of it ended: a request pays for an append, not for the JSON
    and the write. No thread of its own (the SDK's BatchSpanProcessor starts one, and again in each
    child the app forks, a thread a fork, which the instance's pids limit counts). A span that ends
    on a thread other than the loop's is queued the same way; before the loop runs, written at once."""
    import asyncio
    from collections import deque

    from opentelemetry.sdk.trace import SpanProcessor

    class Deferred(SpanProcessor):
        def __init__(self) -> None:
            self.pending: deque[ReadableSpan] = deque(maxlen=MAX_PENDING)
            self.loop: asyncio.AbstractEventLoop | None = None
            self.scheduled = False

        def on_end(self, span: ReadableSpan) -> None:
            if not span.context.trace_flags.sampled:
                return
            self.pending.append(span)
            if self.scheduled:
                return
            try:
                self.loop = asyncio.get_running_loop()
                self.scheduled = True
                self.loop.call_later(FLUSH_S, self.flush)
            except RuntimeError:  # not on the loop's thread
                if self.loop is None or self.loop.is_closed():
                    self.flush()
                    return
                self.scheduled = True
                self.loop.call_soon_threadsafe(self.loop.call_later, FLUSH_S, self.flush)

        def flush(self) -> None:
            self.scheduled = False  # first: a span queued from now on schedules the next flush
            spans = []
            while self.pending:
                spans.append(self.pending.popleft())
            if spans:
                exporter.export(spans)

        def shutdown(self) -> None:
            self.flush()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            self.flush()
            return True

    return Deferred()


def enabled() -> bool:
    return _tracer is not None


def set_status(span: Span, status: int) -> None:
    """An answer's status on its span: 5xx is the span's error (4xx is the caller's, per OpenTelemetry)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))


def _traces_url(endpoint: str) -> str:
    # OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base; the traces path is added to it (the spec's rule).
    return endpoint.rstrip("/") + "/v1/traces"


@contextlib.contextmanager
def server_span(
    name: str, headers: Sequence[tuple[bytes, bytes]] | Mapping[bytes, bytes], attributes: dict[str, Any]
) -> Iterator[Span | None]:
    """A span of the kind SERVER, child of the request's `traceparent`, current while the block runs
    (so a sync handler's thread and the app's own spans see it); None when tracing is off, or when
    the trace is not sampled (`sdk.traceparent`): then no span is made at all, which would cost the
    request more than its answer, and its calls of other apps carry its traceparent on."""
    if _tracer is None:
        yield None
        return
    given = state = b""
    for k, v in headers.items() if isinstance(headers, Mapping) else headers:
        if k == b"traceparent":
            given = v
        elif k == b"tracestate":
            state = v
    if given and not traceparent.valid(given):
        given = b""  # not continued: the span starts a trace of its own
    if given and not traceparent.sampled(given.decode("latin-1")):
        token = traceparent.UNRECORDED.set(given.decode("latin-1"))
        try:
            yield None
        finally:
            traceparent.UNRECORDED.reset(token)
        return
    with _tracer.start_as_current_span(
        name, context=_parent(given, state), kind=_SERVER, attributes=attributes, record_exception=False
    ) as span:
        yield span


def _parent(given: bytes, state: bytes) -> Context:
    """The context of a valid traceparent (`sdk.traceparent.valid`), or an empty one (a new trace):
    what the SDK's TraceContextTextMapPropagator extracts, without its header parsing again."""
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace.span import TraceState

    if not given:
        return Context()
    parent = trace.SpanContext(
        int(given[3:35], 16),
        int(given[36:52], 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(given[53:55], 16)),
        trace_state=TraceState.from_header([state.decode("latin-1")]) if state else None,
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


class _PipeExporter:
    """Spans as JSON lines on the node's pipe (the SpanExporter interface, duck-typed)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        chunk = b""
        for span in spans:
            line = _line(span)
            if line is None:
                continue
            if len(chunk) + len(line) > select.PIPE_BUF:
                self._write(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self._write(chunk)
        return SpanExportResult.SUCCESS

    def _write(self, lines: bytes) -> None:
        """Whole lines of at most PIPE_BUF bytes in one write: the kernel never splits nor mixes it
        with another writer's (a child the app forked writes its spans to the same pipe)."""
        with self.lock, contextlib.suppress(OSError):  # BlockingIOError: the node is behind
            os.write(self.fd, lines)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _line(span: ReadableSpan) -> bytes | None:
    ctx = span.context
    if ctx is None:
        return None
    parent = span.parent
    rec: dict[str, Any] = {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name[:MAX_TEXT],
        "kind": span.kind.name.lower(),
        "start": (span.start_time or 0) / 1e9,
        "end": (span.end_time or 0) / 1e9,
        "status": span.status.status_code.name.lower(),
        "attributes": {
            str(k)[:MAX_TEXT]: v if isinstance(v, bool | int | float) else str(v)[:MAX_TEXT]
            for k, v in itertools.islice((span.attributes or {}).items(), MAX_ATTRS)
        },
    }
    data = (_JSON.encode(rec) + "\n").encode()
    if len(data) > MAX_LINE:  # its attributes go, so the span itself still fits
        rec["attributes"] = {}
        data = (_JSON.encode(rec) + "\n").encode()
    return data if len(data) <= MAX_LINE else None
