"""The instance's HTTP servers: the user's web app on one socket, the platform's endpoints on another.

The web socket carries what the gateway relays from clients; the control socket (function calls and
the health check) is reached only by the platform: both are bound by the node agent in a folder no
app can see, and passed in at fork, so neither a client nor another app can reach the control one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import Any, Literal, cast

import uvicorn

from osless.runtime import applog, function_url, protocol, tracing
from osless.runtime.loader import web_kind
from osless.sdk import App, Context, FunctionSpec, traceparent
from osless.sdk import config as app_config

__all__ = ["ASGIApp", "Instance", "create_instance", "preload", "prewarm", "serve"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# On the control socket (see `serve`): the web socket has no path of the platform's.
INVOKE_PREFIX = "/invoke/"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"  # the app's own prometheus-client metrics, which the node serves under its name
DEBUG_LISTEN_PATH = "/debug/listen"  # the node starts debugpy here for a debug session (runtime/debugger.py)
# On the web socket: `/{app}/_http/{fn}/...` reaches the function `fn` declared with http=True.
HTTP_PREFIX = b"/_http/"
# Events are held in memory whole; past this the caller is told rather than the instance swapping.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# Threads for sync handlers, made as calls need them: a call waiting for one counts against its
# timeout, so as many as an instance takes calls at once in practice (the autoscaler aims at 10; a
# burst goes past it until the new instances are up), whatever the machine's cores (Python's default
# pool: 6 on two). As anyio's, which runs Starlette's sync endpoints: 40.
FUNCTION_THREADS = 40
# A handler still running this long after its function's own timeout gets its instance replaced.
REPLACE_AFTER_S = 0.5
_JSON_HINT = "return dict, list, str, int, float, bool or None"
_HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
_HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None


class Instance:
    """The ASGI app an instance serves: invoke and health endpoints, everything else to the web app."""

    def __init__(self, app: App, web: Any = None) -> None:
        self.app = app
        self.web_kind: Literal["asgi", "wsgi"] | None = web_kind(web) if web is not None else None
        self.web: ASGIApp | None = None
        if self.web_kind == "wsgi":
            from a2wsgi import WSGIMiddleware  # only WSGI apps pay for the import

            self.web = cast(ASGIApp, WSGIMiddleware(_chunked_input(web)))
        elif self.web_kind == "asgi":
            self.web = cast(ASGIApp, web)
        # Set by serve(): a function calling sys.exit() asks the server to stop with that code.
        self.server: _Server | None = None
        self.exit_code: int | None = None
        # Created on first use, so the zygote never forks while holding worker threads.
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        # time.time() when this instance applied its current config version; None for one it inherited.
        self.config_applied_at: float | None = None
        # How to ask the node for a fresh instance in this one's place (set by the zygote at fork).
        self.recycle: Callable[[str], None] = _no_recycle
        self.http_functions = {n: f for n, f in app.functions.items() if f.http}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The web socket's app: every request goes to the user's web app (the platform's own
        endpoints are on the control socket, which only the platform reaches)."""
        if scope["type"] == "http":  # each request: its id, its access line (`runtime.applog`), its span
            trace = _forwarded(scope)
            web = self._web
            if tracing.enabled():
                if trace is None or traceparent.sampled(trace):
                    web = self._traced_web
                else:  # not sampled: no span, which costs more than the request; its calls carry it on
                    traceparent.UNRECORDED.set(trace)  # in this request's own task
            rid = applog.new_request_id()
            await applog.logged(scope, receive, send, web, rid, scope["method"], scope["path"])
        else:
            if scope["type"] == "websocket":
                _forwarded(scope)
            await self._web(scope, receive, send)

    async def _traced_web(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        seen = _StatusSeen(send)
        attributes = {"http.request.method": method, "url.path": path[:256]}
        with tracing.server_span(f"{method} {path[:120]}", scope["headers"], attributes) as span:
            try:
                await self._web(scope, receive, seen.send)
            finally:
                if span is not None and seen.status:
                    tracing.set_status(span, seen.status)

    async def _web(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.http_functions:
            target = self._http_target(scope)
            if target is not None:
                await self._http_function(scope, receive, send, *target)
                return
        if self.web is None:
            await self._no_web_app(scope, receive, send)
            return
        try:
            await self.web(scope, receive, send)
        except SystemExit as e:
            # uvicorn would log and swallow it; honour it the way a plain Python program would.
            self.request_exit(_exit_code(e))
            raise

    async def control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The control socket's app: function calls and the health check, for the platform only."""
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith(INVOKE_PREFIX):
            if scope["method"] != "POST":
                await _send_error(
                    send, 405, "method_not_allowed", f"use POST for {path}", [(b"allow", b"POST")]
                )
                return
            name = path[len(INVOKE_PREFIX) :]
            rid = dict(scope["headers"]).get(applog.REQUEST_HEADER, b"").decode("latin-1")
            rid = rid or applog.new_request_id()

            async def invoke(scope: Scope, receive: Receive, send: Send) -> None:
                await self._invoke(scope, receive, send, name, rid)

            await applog.logged(scope, receive, send, invoke, rid, "INVOKE", name)
        elif path == HEALTH_PATH:
            if scope["method"] not in ("GET", "HEAD"):
                await _send_error(
                    send, 405, "method_not_allowed", f"use GET for {path}", [(b"allow", b"GET")]
                )
                return
            health: dict[str, Any] = {"ok": True, "config_version": app_config.current_version()}
            if self.config_applied_at is not None:
                health["config_applied_at"] = self.config_applied_at
            problem = _egress_problem()
            if problem is not None:
                health.update(ok=False, problem=problem)
            await _send_json(send, 200 if problem is None else 503, health)
        elif path == METRICS_PATH:
            await _app_metrics(send)
        elif path == DEBUG_LISTEN_PATH and scope["method"] == "POST":
            from osless.runtime import debugger  # imported by the first session only

            try:
                port = await asyncio.to_thread(debugger.listen)
            except Exception as e:  # the app's own debugpy, or one that will not start
                await _send_error(send, 503, "debugger_failed", f"debugpy did not start: {e}"[:500])
                return
            await _send_json(send, 200, {"port": port})
        else:
            await _send_error(send, 404, "not_found", f"no control endpoint {path}")

    def watch_config(self, channel: socket.socket) -> None:
        """Apply each config the zygote forwards on `channel`, then run the app's hooks; in the loop."""
        channel.setblocking(False)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._on_config, channel)

    def _on_config(self, channel: socket.socket) -> None:
        # Each message carries every value, so of a backlog only the newest matters.
        latest: tuple[dict[str, Any], int] | None = None
        while True:
            try:
                msg, fds = protocol.recv(channel)
            except BlockingIOError:
                break
            except protocol.ProtocolError as e:
                print(f"osless: ignored a bad config message: {e}", file=sys.stderr, flush=True)
                continue
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                # Only a zygote that gave up on us closes it; it is also gone when the zygote dies, and
                # then this instance dies with it.
                asyncio.get_running_loop().remove_reader(channel.fileno())
                channel.close()
                print(
                    "osless: config channel closed: no further config changes reach this instance",
                    file=sys.stderr,
                    flush=True,
                )
                break
            values, version = msg.get("values"), msg.get("version")
            if msg.get("op") != "config" or not isinstance(values, dict) or not isinstance(version, int):
                print(
                    f"osless: ignored a config message of op {msg.get('op')!r}", file=sys.stderr, flush=True
                )
                continue
            latest = values, version
        if latest is not None:
            changed = app_config.apply(*latest)
            self.config_applied_at = time.time()
            if changed:
                self._run_hooks(changed)

    def _run_hooks(self, changed: dict[str, Any]) -> None:
        for hook in self.app.config_hooks:
            # Sync hooks run right here in the loop (they should be quick); async ones as tasks.
            try:
                result = hook(dict(changed))  # a copy each: one hook's edits are not the next one's input
            except SystemExit as e:
                self.request_exit(_exit_code(e))
                continue
            except Exception as e:
                _hook_failed(hook, e)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(self._await_hook(hook, result))
                self._pending.add(task)  # the loop holds tasks only weakly
                task.add_done_callback(self._pending.discard)

    async def _await_hook(self, hook: Callable[..., Any], awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            pass  # the instance is stopping
        except SystemExit as e:  # caught here: out of a task, asyncio would let it stop the loop
            self.request_exit(_exit_code(e))
        except Exception as e:
            _hook_failed(hook, e)

    def request_exit(self, code: int) -> None:
        """Stop serving gracefully; the instance process then exits with `code`."""
        if self.exit_code is None:
            self.exit_code = code
        if self.server is not None:
            self.server.exit_soon()

    async def _no_web_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif self.http_functions:
            paths = ", ".join(f"/{self.app.name}/_http/{n}/" for n in sorted(self.http_functions))
            why = f"app {self.app.name} has no @app.web() handler; its http functions are at {paths}"
            await _send_error(send, 404, "no_web_app", why)
        else:
            await _send_error(send, 404, "no_web_app", f"app {self.app.name} has no @app.web() handler")

    def _http_target(self, scope: Scope) -> tuple[FunctionSpec, str] | None:
        """The http function a web request is for, and its path under the function's own root:
        `/_http/{fn}/...` names one; without a web app, an app with one http function takes every
        path. None: the request is the web app's."""
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        raw = raw.split(b"?", 1)[0]
        if raw.startswith(HTTP_PREFIX):
            name, _, rest = raw[len(HTTP_PREFIX) :].partition(b"/")
            spec = self.http_functions.get(name.decode("latin-1"))
            if spec is not None:
                return spec, "/" + rest.decode("latin-1")
        if self.web is None and len(self.http_functions) == 1:
            return next(iter(self.http_functions.values())), raw.decode("latin-1")
        return None

    async def _http_function(
        self, scope: Scope, receive: Receive, send: Send, spec: FunctionSpec, raw_path: str
    ) -> None:
        """A web request to a function declared with http=True, as a Lambda Function URL event."""
        request_id = applog.REQUEST_ID.get() or applog.new_request_id()
        extra = [(b"x-osless-request-id", request_id.encode("ascii"))]
        body = await _read_body(receive, MAX_EVENT_BYTES)
        if body is None:
            return
        if len(body) > MAX_EVENT_BYTES:
            message = f"the request body is over the {MAX_EVENT_BYTES // (1024 * 1024)} MiB limit"
            await _send_error(send, 413, "too_large", message, extra)
            return
        client = scope.get("client")
        event = function_url.event_of(
            method=scope["method"],
            raw_path=raw_path,
            query=scope.get("query_string", b""),
            headers=scope["headers"],
            body=body,
            http_version=scope.get("http_version", "1.1"),
            source_ip=str(client[0]) if client else "",
            request_id=request_id,
            app=self.app.name,
            now=time.time(),
        )
        deadline = time.time() + spec.timeout_s
        result, failure = await self._call(
            spec, event, self._context(request_id, spec, deadline), False, deadline
        )
        if failure is not None:
            status, error = failure
            if status != 504:
                # The caller has no token: what the function raised stays in the app's log
                # (`_function_error`), as a Function URL answers an unhandled error with a bare 502.
                status = 502
                message = f"function {spec.name} failed; its error is in the app's log (request {request_id})"
                error = _error_body("function_error", message)
            await _send_body(send, status, error, extra)
            return
        try:
            answer = function_url.answer_of(result)
        except function_url.BadAnswer as e:
            message = f"function {spec.name} answered what cannot be an HTTP answer: {e}"
            print(f"{message} (request {request_id})", file=sys.stderr, flush=True)
            await _send_error(send, 502, "bad_function_answer", message, extra)
            return
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode()), *extra]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        if self.exit_code is not None and self.server is not None:
            self.server.exit_soon()

    def _context(self, request_id: str, spec: FunctionSpec, deadline: float) -> Context:
        release = os.environ.get("OSLESS_RELEASE", "")  # set by the node at fork
        return Context(
            request_id,
            self.app.name,
            spec.name,
            deadline,
            release=int(release) if release.isdigit() else None,
            memory_mb=spec.memory_mb,
            instance=os.environ.get("OSLESS_INSTANCE", ""),
        )

    async def _invoke(self, scope: Scope, receive: Receive, send: Send, name: str, request_id: str) -> None:
        headers = dict(scope["headers"])
        extra = [(b"x-osless-request-id", request_id.encode("latin-1"))]
        if release := os.environ.get("OSLESS_RELEASE", ""):
            extra.append((b"x-osless-release", release.encode("latin-1")))  # Lambda's ExecutedVersion
        spec = self.app.functions.get(name)
        if spec is None:
            known = ", ".join(sorted(self.app.functions)) or "none"
            message = f"app {self.app.name} has no function {name!r} (functions: {known})"
            await _send_error(send, 404, "unknown_function", message, extra)
            return
        body = await _read_body(receive, MAX_EVENT_BYTES)
        if body is None:  # the caller went away; nobody to answer
            return
        if len(body) > MAX_EVENT_BYTES:
            message = f"event is over the {MAX_EVENT_BYTES // (1024 * 1024)} MiB limit"
            await _send_error(send, 413, "event_too_large", message, extra)
            return
        try:
            event = json.loads(body) if body.strip() else None
        except ValueError as e:
            await _send_error(send, 400, "bad_event", f"the event is not valid JSON: {e}", extra)
            return

        deadline = own_deadline = time.time() + spec.timeout_s
        by_caller = False
        header = headers.get(b"x-osless-deadline")
        if header is not None:
            try:
                caller_deadline = float(header)
            except ValueError:
                caller_deadline = math.inf  # unreadable: the function's own timeout still applies
            if caller_deadline < deadline:
                deadline, by_caller = caller_deadline, True
        ctx = self._context(request_id, spec, deadline)

        attributes = {"faas.invoked_name": spec.name, "faas.invocation_id": request_id}
        with tracing.server_span(f"invoke {spec.name}", headers, attributes) as span:
            status, payload = await self._run(spec, event, ctx, by_caller, own_deadline)
            if span is not None:
                tracing.set_status(span, status)
        if status == 500 and headers.get(b"x-osless-public") == b"1" and _code(payload) == "function_error":
            # A public function called without a token (the gateway says so): what it raised stays in
            # the app's log (`_function_error`), as for an http function; the caller gets the request.
            message = f"function {spec.name} failed; its error is in the app's log (request {request_id})"
            payload = _error_body("function_error", message)
        await _send_body(send, status, payload, extra)
        if self.exit_code is not None and self.server is not None:
            self.server.exit_soon()  # only now, so the caller still gets its answer

    async def _run(
        self, spec: FunctionSpec, event: Any, ctx: Context, by_caller: bool, own_deadline: float
    ) -> tuple[int, bytes]:
        """Run the handler within the deadline: (status, JSON body)."""
        result, failure = await self._call(spec, event, ctx, by_caller, own_deadline)
        return failure if failure is not None else _serialise(spec.name, result)

    async def _call(
        self, spec: FunctionSpec, event: Any, ctx: Context, by_caller: bool, own_deadline: float
    ) -> tuple[Any, tuple[int, bytes] | None]:
        """Run the handler within the deadline: (its result, None), or (None, (status, error body))."""
        name = spec.name
        if by_caller:
            timeout_msg = f"function {name} did not finish before the caller's deadline"
        else:
            timeout_msg = f"function {name} did not finish within {spec.timeout_s:g}s"
        if ctx.deadline <= time.time():
            return None, (504, _error_body("timeout", timeout_msg))
        future: asyncio.Future[Any]
        finished = threading.Event()  # set when the handler's code has returned or raised, whatever waited
        if spec.is_async:
            future = asyncio.ensure_future(_call_async(spec.handler, event, ctx, finished))
        else:
            # Sync handlers run in a thread so one slow call does not stall the other requests.
            # copy_context: the handler sees the request's contextvars, as asyncio.to_thread would.
            call = contextvars.copy_context().run
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool(), call, _call_sync, spec.handler, event, ctx, finished)
        try:
            result = await self._within(future, ctx.deadline)
            if inspect.isawaitable(result):  # a sync-looking wrapper around an async handler
                finished.clear()
                result = await self._within(asyncio.ensure_future(_await(result, finished)), ctx.deadline)
        except _Deadline:
            self._replace_if_still_running(finished, own_deadline, f"function {name} ran past its timeout")
            return None, (504, _error_body("timeout", timeout_msg))
        except _Raised as raised:
            e = raised.error
            if isinstance(e, SystemExit):
                self.request_exit(_exit_code(e))
                message = f"function {name} exited the instance with sys.exit({e.code!r})"
            else:
                text = str(e)
                message = f"{type(e).__name__}: {text}" if text else type(e).__name__
            error = self._function_error(ctx, message, _user_traceback(e, spec), type(e).__name__)
            return None, (500, error)
        return result, None

    def _replace_if_still_running(self, finished: threading.Event, own_deadline: float, reason: str) -> None:
        """A handler past its deadline may run on (a thread cannot be stopped; a task may ignore its
        cancellation), holding a worker and whatever it holds. If it is still running shortly after
        the function's own timeout (not merely a caller's shorter deadline), the node replaces this
        instance with a fresh one, as Lambda resets an environment; this one stops once its other
        requests are done."""

        def check() -> None:
            if not finished.is_set():
                self.recycle(reason)

        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, own_deadline - time.time()) + REPLACE_AFTER_S, check)

    async def _within(self, future: asyncio.Future[Any], deadline: float) -> Any:
        # asyncio.wait, not wait_for: a TimeoutError raised by the handler itself is its own error,
        # not the platform's deadline.
        done, _ = await asyncio.wait({future}, timeout=max(0.0, deadline - time.time()))
        if not done:
            # A thread cannot be stopped: it runs on, and its result is dropped.
            future.cancel()
            self._keep_until_done(future)
            raise _Deadline
        if future.cancelled():  # the handler cancelled itself: its failure, not the platform's
            raise _Raised(asyncio.CancelledError("the function's task was cancelled"))
        return future.result()

    def _function_error(self, ctx: Context, message: str, tb: str, kind: str) -> bytes:
        # Also to stderr: the caller sees the error, the instance log keeps it.
        print(f"function {ctx.function} failed (request {ctx.request_id}): {message}\n{tb}", file=sys.stderr)
        sys.stderr.flush()
        return _error_body("function_error", message, tb, kind)

    def _pool(self) -> ThreadPoolExecutor:
        # Our own pool, not the loop's default one: asyncio.run() joins the default pool on exit, and a
        # timed-out handler that never returns would keep the instance from ever exiting.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(FUNCTION_THREADS, thread_name_prefix="osless-fn")
        return self._executor

    def _keep_until_done(self, future: asyncio.Future[Any]) -> None:
        # The loop keeps only weak references to tasks; hold abandoned ones and read their outcome so
        # asyncio does not log "exception was never retrieved".
        self._pending.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._pending.discard(f)
            if not f.cancelled():
                f.exception()

        future.add_done_callback(done)


class _StatusSeen:
    """`send`, noting the answer's status for the request's span. Its other attributes are those of
    the server's own `send.__self__` (uvicorn's request cycle): an app that reaches through `send`
    to the server finds what it would without tracing."""

    __slots__ = ("_send", "status")

    def __init__(self, send: Send) -> None:
        object.__setattr__(self, "_send", send)
        object.__setattr__(self, "status", 0)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            object.__setattr__(self, "status", message["status"])
        await self._send(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._send.__self__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._send.__self__, name, value)


def _no_recycle(reason: str) -> None:
    print(f"osless: this instance should be replaced: {reason}", file=sys.stderr, flush=True)


def _egress_problem() -> str | None:
    """Why the sandbox's egress forwarder is not there, if the instance has one (its proxy variables
    say so): an instance without its egress is not healthy. Read from the sandbox's own table of
    TCP sockets rather than by connecting, which would cost the node's egress proxy a connection."""
    proxy = os.environ.get("HTTP_PROXY", "")
    if not proxy.startswith("http://127.0.0.1:"):
        return None
    try:
        port = int(proxy.rsplit(":", 1)[1])
    except ValueError:
        return f"HTTP_PROXY is {proxy[:100]!r}, not the sandbox's forwarder"
    listening = f"0100007F:{port:04X}"  # 127.0.0.1:port as /proc/net/tcp spells it
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == listening and fields[3] == "0A":  # LISTEN
                    return None
    except OSError as e:
        return f"cannot tell whether the egress forwarder listens: {e}"
    return f"the egress forwarder is not listening on 127.0.0.1:{port}"


class _Deadline(Exception):
    """The handler did not finish in time."""


class _Raised(Exception):
    """What the handler raised, carried untouched: asyncio would turn a SystemExit into a stop of the
    loop, and a TimeoutError from a thread into a fresh one without its traceback."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


async def _call_async(
    handler: Callable[..., Any], event: Any, ctx: Context, finished: threading.Event
) -> Any:
    try:
        return await handler(event, ctx)
    except asyncio.CancelledError:
        raise  # our own cancellation at the deadline
    except BaseException as e:
        raise _Raised(e) from None
    finally:
        finished.set()


def _call_sync(handler: Callable[..., Any], event: Any, ctx: Context, finished: threading.Event) -> Any:
    try:
        return handler(event, ctx)
    except BaseException as e:
        raise _Raised(e) from None
    finally:
        finished.set()


async def _await(awaitable: Awaitable[Any], finished: threading.Event) -> Any:
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise  # our own cancellation at the deadline
    except BaseException as e:
        raise _Raised(e) from None
    finally:
        finished.set()


def _hook_failed(hook: Callable[..., Any], e: BaseException) -> None:
    name = getattr(hook, "__qualname__", None) or repr(hook)
    print(f"on_config_change hook {name} failed:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    sys.stderr.flush()


def create_instance(app: App) -> Instance:
    """Call the app's web factory (if any) once and wrap everything in an Instance."""
    web = app.web_spec.factory() if app.web_spec is not None else None
    return Instance(app, web)


def _config(instance: Instance) -> uvicorn.Config:
    timeouts = [f.timeout_s for f in instance.app.functions.values()]
    if instance.app.web_spec is not None:
        timeouts.append(instance.app.web_spec.timeout_s)
    return uvicorn.Config(
        instance,
        interface="asgi3",
        lifespan="auto" if instance.web is not None else "off",
        ws="auto" if instance.web is not None else "none",
        log_level="warning",
        access_log=False,
        loop="uvloop" if _HAS_UVLOOP else "asyncio",
        http=_http_protocol(),
        proxy_headers=False,  # applied by Instance itself, in the same pass as the prefix
        # No request legitimately outlives the longest timeout; past that, a stop stops.
        timeout_graceful_shutdown=int(max(timeouts, default=30.0)) + 1,
    )


def _control_config(instance: Instance) -> uvicorn.Config:
    return uvicorn.Config(
        instance.control,
        interface="asgi3",
        lifespan="off",
        ws="none",
        log_level="warning",
        access_log=False,
        http=_http_protocol(),
        proxy_headers=False,
    )


def _http_protocol() -> Any:
    if not _HAS_HTTPTOOLS:
        return "h11"
    from osless.runtime.http import InstanceHttpProtocol

    return InstanceHttpProtocol


def _forwarded(scope: Scope) -> str | None:
    """What the gateway says of the request, into the scope, and its `traceparent`. Only the gateway
    reaches this socket, so its X-Forwarded-* headers are trusted (and it drops any a client sent),
    as is its traceparent (checked or made there)."""
    trace = None
    for name, value in scope["headers"]:
        if name == b"traceparent":
            trace = value.decode("latin-1")
        elif name == b"x-forwarded-for":
            scope["client"] = (value.decode("latin-1"), 0)
        elif name == b"x-forwarded-proto":
            proto = value.decode("latin-1")
            scope["scheme"] = proto.replace("http", "ws") if scope["type"] == "websocket" else proto
        elif name == b"x-forwarded-prefix":
            # The gateway strips /{app} and says so. As the ASGI spec wants, the path is whole again
            # and root_path its prefix: frameworks take root_path off the path themselves (Django,
            # Starlette, a2wsgi's PATH_INFO) and build their URLs with it. uvicorn has no root_path
            # of its own here, so the path holds none yet. raw_path stays the bytes this server got:
            # apps that route on it (Datasette) keep their routes.
            prefix = value.decode("latin-1")
            scope["root_path"] = prefix
            scope["path"] = prefix + scope["path"]
    return trace


_PRELOADED: dict[int, tuple[uvicorn.Config, uvicorn.Config]] = {}


def preload() -> None:
    """Import the server modules an instance uses, before any app is on the path: these are then the
    runtime's own, whatever versions the app's layers hold (docs/apps.md, "What an app imports")."""
    for name in (
        "uvicorn.protocols.http.httptools_impl",
        "uvicorn.protocols.websockets.auto",
        "uvicorn.lifespan.on",
    ):
        importlib.import_module(name)
    if _HAS_UVLOOP:
        importlib.import_module("uvloop")


def prewarm(instance: Instance) -> None:
    """Import and build everything serve() needs, so a forked instance only listens and serves.

    The loaded uvicorn configs (logging set up, protocol classes imported, apps wrapped) are kept:
    a child inherits them, which saves ~1.5 ms a start.
    """
    config = _config(instance)
    config.load()  # imports the protocol, websocket and lifespan classes
    config.get_loop_factory()  # imports uvloop
    control = _control_config(instance)
    control.load()
    _PRELOADED[id(instance)] = (config, control)
    tracing.preload(instance.app.name)


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        control: tuple[uvicorn.Config, socket.socket],
        on_listening: Callable[[], None] | None,
        instance: Instance,
        config_channel: socket.socket | None,
    ) -> None:
        super().__init__(config)
        self._control = control
        self._on_listening = on_listening
        self._instance = instance
        self._config_channel = config_channel
        self._exit_asked = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def exit_soon(self) -> None:
        """Stop serving gracefully, now rather than at the next tick."""
        self.should_exit = True
        self._exit_asked.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: wake the loop wherever it waits
            self._loop.call_soon_threadsafe(self._exit_asked.set)

    async def main_loop(self) -> None:
        # uvicorn looks every 0.1 s whether to exit: ten wakes a second for each of a node's idle
        # instances, which on a busy host delays the work of the others (a config push reaches them
        # all at once). Once a second instead (the Date header's pace), and at once when told to exit.
        self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._exit_asked.wait()
            should_exit = await self.on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # startup() returns once lifespan startup is done and the web socket is listening.
        await super().startup(sockets=sockets)
        if not self.started:
            return
        config, sock = self._control
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state={}, _loop=loop
            )

        # Listening here, in the instance, is what makes SO_PEERCRED name this process to the
        # gateway; shut down with the web server (uvicorn closes every server in `servers`).
        self.servers.append(await loop.create_server(protocol, sock=sock, backlog=config.backlog))
        # After the app's lifespan startup, so no hook runs before the app is set up; changes sent
        # meanwhile wait in the channel.
        if self._config_channel is not None:
            self._instance.watch_config(self._config_channel)
        if self._on_listening is not None:
            self._on_listening()


def serve(
    instance: Instance,
    web: socket.socket,
    control: socket.socket,
    on_listening: Callable[[], None] | None = None,
    config_channel: socket.socket | None = None,
) -> int:
    """Serve `instance` on two bound unix sockets until told to stop; returns the exit code.

    `web` gets the web app, `control` the platform's endpoints; both are listened on here.
    `config_channel` is the instance's end of its zygote's config channel (`Instance.watch_config`).
    """
    _log_to_stderr()
    configs = _PRELOADED.pop(id(instance), None)  # this process's own copies, after the fork
    config, control_config = (
        configs if configs is not None else (_config(instance), _control_config(instance))
    )
    if not control_config.loaded:
        control_config.load()
    endpoint = app_config._state.values.get(tracing.ENDPOINT_KEY)
    tracing.start(
        instance.app.name,
        os.environ.get("OSLESS_INSTANCE", ""),
        endpoint if isinstance(endpoint, str) else None,
    )
    server = _Server(config, (control_config, control), on_listening, instance, config_channel)
    instance.server = server
    try:
        server.run(sockets=[web])
    finally:
        applog.flush()  # the access lines that waited for company
        tracing.flush()
    return instance.exit_code or 0


def _log_to_stderr() -> None:
    # ctx.log.info() should reach the instance log even if the app never configures logging.
    root = logging.getLogger()
    app_logger = logging.getLogger("osless.app")
    if not root.handlers and not app_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        app_logger.addHandler(handler)
        app_logger.setLevel(logging.INFO)


def _exit_code(e: SystemExit) -> int:
    # Same mapping as the interpreter's own: None is 0, an int is itself, anything else is printed and 1.
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr, flush=True)
    return 1


def _user_traceback(e: BaseException, spec: FunctionSpec) -> str:
    """The traceback from the handler's frame down: the runtime's own frames only add noise."""
    tb: TracebackType | None = e.__traceback__
    handler_code = getattr(spec.handler, "__code__", None)
    probe = tb
    while probe is not None and probe.tb_frame.f_code is not handler_code:
        probe = probe.tb_next
    if probe is not None:  # else (a decorated handler, say) the whole traceback is kept
        tb = probe
    return "".join(traceback.format_exception(type(e), e, tb))


def _serialise(name: str, result: Any) -> tuple[int, bytes]:
    culprit: list[Any] = []

    def default(obj: Any) -> Any:
        culprit.append(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return 200, json.dumps(result, default=default, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        if culprit and culprit[0] is result:
            what = f"a {type(result).__name__}"
        elif culprit:
            what = f"a {type(result).__name__} containing a {type(culprit[0]).__name__}"
        else:  # NaN, a circular reference, a tuple as a dict key...
            what = f"a {type(result).__name__} ({e})"
        message = f"function {name} returned {what}, which is not JSON-serialisable: {_JSON_HINT}"
        return 500, _error_body("result_not_json", message)


def _code(body: bytes) -> str:
    """The code of an error body of `_error_body`'s."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _error_body(code: str, message: str, tb: str | None = None, kind: str | None = None) -> bytes:
    error: dict[str, str] = {"code": code, "message": message}
    if tb is not None:
        error["traceback"] = tb
    if kind is not None:
        error["type"] = kind  # the exception's class: Lambda's errorType
    return json.dumps({"error": error}).encode()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (cut just past `limit`), or None if the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        if size <= limit:
            chunks.append(chunk)
            size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_body(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _app_metrics(send: Send) -> None:
    """The app's default prometheus-client registry, if the app imported prometheus-client (its
    own dependency: the platform adds none to the sandbox); 404 otherwise. In a thread: the app's
    own collectors run in it."""
    client = sys.modules.get("prometheus_client")
    if client is None:
        await _send_error(send, 404, "no_metrics", "the app does not use prometheus-client")
        return
    try:
        body = await asyncio.to_thread(client.generate_latest, client.REGISTRY)
    except Exception as e:  # the app's collector failed: said, not a crash of the control socket
        await _send_error(send, 500, "metrics_failed", f"the app's metrics failed: {e!r}"[:1000])
        return
    await _send_body(send, 200, body)  # read by the node only, as Prometheus text whatever its type says


async def _send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_body(send, status, json.dumps(obj).encode(), headers)


async def _send_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_body(send, status, _error_body(code, message), headers)


def _chunked_input(wsgi: Any) -> Any:
    """A chunked request body has no CONTENT_LENGTH, and WSGI frameworks (Werkzeug) then read
    nothing unless the server says the input ends by itself, which a2wsgi's does."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if (
            not environ.get("CONTENT_LENGTH")
            and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        ):
            environ["wsgi.input_terminated"] = True
        return wsgi(environ, start_response)

    return app
