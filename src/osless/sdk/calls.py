"""`osless.function("orders.quote")`: another app's function, called from app code as this app.

The call goes out through the node's egress proxy like any request of the app (the sandbox's
`HTTP_PROXY`), to `http://orders.osless/__osless__/functions/quote`, a path no app can serve. The
proxy knows which app speaks (one socket per app) and the platform checks that the callee allows
it (`osless functions allow orders.quote --app shop`): the app holds no credential for this.
Stdlib only, as all the SDK: it runs inside instances. In an instance that traces, the call is a span
and its `traceparent` goes along, so the callee's span is its child (`osless.runtime.tracing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from osless.sdk import traceparent
from osless.sdk.app import FUNCTION_RE, NAME_RE
from osless.sdk.errors import OslessError, UsageError, error_parts

__all__ = ["FunctionCallError", "RemoteFunction", "function"]

# The longest a function may run (3600 s) and the trip: a call is not cut short on this side.
DEFAULT_TIMEOUT_S = 3660.0
MAX_ANSWER = 64 * 1024 * 1024  # read at most this much of an answer


class FunctionCallError(OslessError):
    """A call of another app's function failed: `status` (0 if nothing answered), `code` and the
    platform's message (403 `not_allowed` says how to grant the call; 500 `function_error` is the
    function's own exception)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RemoteFunction:
    """A function of an app, by name. `call(event)` returns its JSON result; `await acall(event)`
    is the same from async code."""

    app: str
    name: str

    @property
    def url(self) -> str:
        return f"http://{self.app}.osless/__osless__/functions/{self.name}"

    def call(self, event: Any = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Invoke it with `event` (anything JSON can carry) and wait for its result."""
        try:
            body = json.dumps(event).encode()
        except (TypeError, ValueError) as e:
            raise UsageError(f"the event for {self.app}.{self.name} must be JSON: {e}") from e
        with _span(self) as trace_headers:
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"content-type": "application/json", **trace_headers},
            )
            return self._send(request, timeout)

    def _send(self, request: urllib.request.Request, timeout: float) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return _result(resp.read(MAX_ANSWER + 1))
        except urllib.error.HTTPError as e:
            raise _error(self, e.code, e.read(MAX_ANSWER)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FunctionCallError(
                0,
                "unreachable",
                f"cannot call {self.app}.{self.name}: {reason} (functions are called this way from the "
                "code of an app running on osless, through its egress proxy)",
            ) from e

    async def acall(self, event: Any = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """`call`, awaited: the request runs in a thread, so the event loop goes on meanwhile."""
        return await asyncio.to_thread(self.call, event, timeout=timeout)


@contextlib.contextmanager
def _span(fn: RemoteFunction) -> Iterator[dict[str, str]]:
    """A span of the kind CLIENT for the call, and the `traceparent` that makes the callee's span its
    child. Outside an instance that traces (no opentelemetry, or no provider set) it records nothing."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        yield {}
        return
    unrecorded = traceparent.UNRECORDED.get()
    if unrecorded is not None and not trace.get_current_span().get_span_context().is_valid:
        yield {"traceparent": unrecorded}  # a trace not sampled: its callee records nothing either
        return
    attributes = {"osless.callee.app": fn.app, "osless.callee.function": fn.name}
    with trace.get_tracer("osless").start_as_current_span(
        f"call {fn.app}.{fn.name}", kind=trace.SpanKind.CLIENT, attributes=attributes, record_exception=False
    ):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield carrier


def _result(data: bytes) -> Any:
    if len(data) > MAX_ANSWER:
        raise FunctionCallError(502, "too_large", f"the answer is past {MAX_ANSWER} bytes")
    try:
        return json.loads(data) if data else None
    except ValueError as e:
        raise FunctionCallError(502, "bad_answer", f"the answer is not JSON: {e}") from e


def _error(fn: RemoteFunction, status: int, data: bytes) -> FunctionCallError:
    return FunctionCallError(status, *error_parts(status, data, f"calling {fn.app}.{fn.name}"))


def function(name: str) -> RemoteFunction:
    """The function `APP.FUNCTION` of another app: `osless.function("orders.quote").call({"sku": 1})`."""
    app, _, fn = name.partition(".") if isinstance(name, str) else ("", "", "")
    if not NAME_RE.fullmatch(app) or not FUNCTION_RE.fullmatch(fn):
        raise UsageError(
            f"osless.function({name!r}): name a function as APP.FUNCTION, "
            "such as osless.function('orders.quote')"
        )
    return RemoteFunction(app, fn)
