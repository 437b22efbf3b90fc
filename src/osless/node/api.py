"""The node API: a small HTTP server in the node process, for what stays on the node's own disk.

It serves the logs of the node's instances (`GET /logs/apps/{app}`) and their recent spans
(`GET /traces/apps/{app}`, `node.traces`), which the API merges across nodes, as Kubernetes' API
server asks the kubelet, the files of its apps' volumes
(`/volumes/apps/{app}/...`, `node.volapi`), and runs the commands the API asks for (`WS /runs/{app}`:
`osless run`, release steps; `node.runs`). The caller's own bearer token comes along;
the node asks the API who it is (`GET /v1/whoami`, cached a moment by digest) and decides as the API
would: the permission the route needs and, for a token limited to one app, that app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.protocols.http.h11_impl import H11Protocol

from osless import runwire, tokens
from osless.logs import MAX_GREP_CHARS, MAX_REQUEST_CHARS, LogFilter, follow, read_tail
from osless.node import attach, debug, volapi
from osless.node.traces import SpanStore
from osless.node.volumes import Volumes

__all__ = ["Callers", "NodeApi", "Runner", "create_app", "record_line"]

# What runs a command the API asked for, over its accepted websocket (`node.runs.NodeRuns.serve`).
Runner = Callable[[WebSocket, str], Awaitable[None]]

MAX_TAIL = 100_000  # as the API's route
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
# Names become path segments of the node's log folder: no '/', '..' or control characters.
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_CHARS}}}")
# The API's tokens that a node takes: kept ones, an app's own, and those the API makes for one node.
_TOKEN_PREFIXES = (tokens.PLAIN, tokens.APP, *(tokens.SCOPED[role] for role in tokens.NODE_BOUND))
_NODE_BOUND = tokens.NODE_BOUND


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _filter(q: Any) -> LogFilter | Response:
    """The filters a reader asked for (`since` an epoch time, `grep` a substring, `request` an id), or
    the answer saying which is wrong."""
    since: float | None = None
    if q.get("since"):
        try:
            since = float(q["since"])
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            return _error(400, "invalid_request", "since must be a time in seconds since the epoch")
    grep, request = q.get("grep") or None, q.get("request") or None
    if grep is not None and len(grep) > MAX_GREP_CHARS:
        return _error(400, "invalid_request", f"grep is at most {MAX_GREP_CHARS} characters")
    if request is not None and not _REQUEST_ID.fullmatch(request):
        return _error(400, "invalid_request", f"{request[:100]!r} is not a request id")
    return LogFilter(since=since, grep=grep, request=request)


def record_line(rec: dict[str, Any]) -> bytes:
    """One NDJSON line. Characters are kept as UTF-8, not escaped: a record's size stays within
    6 bytes a character of its line (a control character's escape), which readers bound."""
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8", "replace")


@dataclass
class _Who:
    permissions: frozenset[str]
    app: str | None  # set: the token is limited to this app
    role: str = ""
    name: str = ""


class Callers:
    """Who a bearer token belongs to, as the API says (`GET /v1/whoami`), cached `ttl_s` by the
    token's digest (never the token itself) in a bounded LRU, refusals included."""

    def __init__(self, api_url: str, *, node: str = "", ttl_s: float = 2.0, size: int = 1024) -> None:
        self.node = node  # a reader token opens this node's logs only if it was made for it
        self.ttl_s = ttl_s
        self.size = size
        self._cache: OrderedDict[str, tuple[float, _Who | None]] = OrderedDict()  # digest -> (until, who)
        self._born: OrderedDict[str, tuple[float, float]] = OrderedDict()  # app -> (until, created_at)
        self._client = httpx.AsyncClient(
            base_url=api_url.rstrip("/"),
            verify=api_url.startswith("https://"),
            timeout=httpx.Timeout(10.0, connect=5.0),
        )

    async def check(self, request: HTTPConnection, permission: str, app: str) -> Response | None:
        """None when the request's token may do `permission` on `app`; else the refusal to answer."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "unauthorized", "not authenticated: send the API's bearer token")
        token = token.strip()
        if not token.startswith(_TOKEN_PREFIXES):
            return _error(401, "unauthorized", "not an osless token")
        try:
            who = await self._who(token)
        except _CannotSay as e:
            return _error(503, "unavailable", f"the API could not say who this token is: {e}")
        if who is None:
            return _error(401, "unauthorized", "the API does not know this token (revoked or expired?)")
        if permission != "run" and permission not in who.permissions:
            return _error(403, "forbidden", f"this token lacks the {permission!r} permission")
        if who.app is not None and who.app != app:
            return _error(403, "forbidden", f"this token is limited to app {who.app!r}")
        if who.role in _NODE_BOUND and not who.name.endswith(f"@{self.node}"):
            # Shown to another node: that node may not use it on this one.
            return _error(403, "forbidden", f"this {who.role} token was made for another node")
        if permission == "run" and who.role != "runner":  # only the API asks a node to run a command
            return _error(403, "forbidden", "a command runs here only as the API asks (`osless run`)")
        return None

    async def born(self, request: Request, app: str) -> float | Response:
        """When `app` was made, as the API tells this (already checked) caller; or the answer to give.

        Records older than that are of an earlier app of the same name, deleted: whoever reads the
        new app must not read them, and the node keeps its folder until it is collected.
        """
        now = time.monotonic()
        cached = self._born.get(app)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            resp = await self._client.get(
                f"/v1/apps/{app}", headers={"authorization": request.headers["authorization"]}
            )
        except httpx.HTTPError as e:
            return _error(503, "unavailable", f"the API could not say when app {app!r} was made: {e}")
        if resp.status_code == 404:
            return _error(404, "not_found", f"no app {app!r}: `osless apps` lists them")
        created = None
        with contextlib.suppress(ValueError, AttributeError):
            created = resp.json().get("created_at") if resp.status_code == 200 else None
        if not isinstance(created, int | float) or isinstance(created, bool):
            return _error(503, "unavailable", f"the API could not say when app {app!r} was made")
        self._born[app] = (now + self.ttl_s, float(created))
        self._born.move_to_end(app)
        while len(self._born) > self.size:
            self._born.popitem(last=False)
        return float(created)

    async def _who(self, token: str) -> _Who | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(digest)
            return cached[1]
        try:
            resp = await self._client.get("/v1/whoami", headers={"authorization": f"Bearer {token}"})
        except httpx.HTTPError as e:
            raise _CannotSay(f"{type(e).__name__}: {e}") from None
        who: _Who | None
        if resp.status_code in (401, 403):
            who = None
        elif resp.status_code == 200:
            try:
                body = resp.json()
                permissions = frozenset(str(p) for p in body.get("permissions") or ())
                app = body.get("app")
                role, name = str(body.get("role") or ""), str(body.get("name") or "")
            except (ValueError, AttributeError, TypeError):
                raise _CannotSay("its answer was not a whoami record") from None
            who = _Who(permissions, app if isinstance(app, str) else None, role, name)
        else:  # 429, 5xx: not an answer about the token; asked again next time
            raise _CannotSay(f"it answered {resp.status_code}")
        self._cache[digest] = (now + self.ttl_s, who)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.size:  # made-up tokens cannot grow it
            self._cache.popitem(last=False)
        return who

    async def aclose(self) -> None:
        await self._client.aclose()


class _CannotSay(Exception):
    """The API gave no answer about a token (unreachable, 429, 5xx)."""


def create_app(
    logs_dir: Path,
    callers: Callers,
    volumes: Volumes | None = None,
    runs: Runner | None = None,
    profiler: debug.Profiler | None = None,
    traces: SpanStore | None = None,
    metrics: Callable[[], bytes] | None = None,
    app_metrics: Callable[[str], Awaitable[bytes]] | None = None,
    attacher: attach.Attacher | None = None,
) -> Starlette:
    """The node API's routes over the node's log folder (`<data dir>/logs`), given the agent's
    `volumes`, its apps' volumes (`node.volapi`), with `runs`, the commands the API asks this
    node to run (`WS /runs/{app}`, `node.runs`), and with `profiler`, its instances' stacks and
    profiles (`node.debug`)."""

    async def app_logs(request: Request) -> Response:
        app = request.path_params["app"]
        if not _NAME.fullmatch(app):
            return _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        q = request.query_params
        instance = q.get("instance") or None
        if instance is not None and not _NAME.fullmatch(instance):
            return _error(400, "invalid_request", f"{instance[:100]!r} is not an instance id")
        try:
            tail = int(q.get("tail", "100"))
        except ValueError:
            tail = -1
        if not 0 <= tail <= MAX_TAIL:
            return _error(400, "invalid_request", f"tail must be an integer from 0 to {MAX_TAIL}")
        follow_ = q.get("follow", "false").lower()
        if follow_ not in ("true", "false", "1", "0"):
            return _error(400, "invalid_request", "follow must be true or false")
        match = _filter(q)
        if isinstance(match, Response):
            return match
        refused = await callers.check(request, "logs", app)
        if refused is not None:
            return refused
        born = await callers.born(request, app)
        if isinstance(born, Response):
            return born
        folder = logs_dir / "apps" / app

        def paths() -> list[Path]:
            if instance:
                return [folder / f"{instance}.log"]
            return sorted(folder.glob("*.log")) if folder.is_dir() else []

        async def stream() -> AsyncIterator[bytes]:
            # A follow ends when the client goes: Starlette cancels this on its disconnect.
            if follow_ in ("true", "1"):
                async for rec in follow(paths, tail=tail, poll_s=0.1, match=match or None):
                    if rec.get("ts", 0) >= born:
                        yield record_line(rec)
            else:
                # Off the loop: a tail reads up to two capped files per instance, and parses each line;
                # the loop also serves the agent, the heartbeats and every other app's requests.
                for rec in await asyncio.to_thread(read_tail, paths(), tail, match or None):
                    if rec.get("ts", 0) >= born:
                        yield record_line(rec)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def app_traces(request: Request) -> Response:
        """The recent spans of the app's instances on this node (`node.traces`), those of one trace
        with `?trace=`; read with the `logs` permission, as the app's logs are."""
        app = request.path_params["app"]
        if not _NAME.fullmatch(app):
            return _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        trace = request.query_params.get("trace") or None
        if trace is not None and not _TRACE_ID.fullmatch(trace):
            return _error(400, "invalid_request", "trace must be a trace id: 32 lowercase hex digits")
        refused = await callers.check(request, "logs", app)
        if refused is not None:
            return refused
        born = await callers.born(request, app)
        if isinstance(born, Response):
            return born
        return JSONResponse({"spans": traces.spans(app, trace, since=born) if traces is not None else []})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def scrape(request: Request) -> Response:
        # A token that may read the platform (admin, read, debug, node, controller, gateway); not one
        # limited to an app, which would see the others' figures.
        refused = await callers.check(request, "read", "")
        if refused is not None:
            return refused
        if metrics is None:
            return _error(404, "not_found", "this node serves no metrics")
        return Response(metrics(), media_type=METRICS_CONTENT_TYPE)

    async def scrape_app(request: Request) -> Response:
        app = request.path_params["app"]
        if not _NAME.fullmatch(app):
            return _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        refused = await callers.check(request, "read", app)  # a token of this app's may read them
        if refused is not None:
            return refused
        if app_metrics is None:
            return _error(404, "not_found", "this node serves no metrics")
        return Response(await app_metrics(app), media_type=METRICS_CONTENT_TYPE)

    async def run(websocket: WebSocket) -> None:
        app = websocket.path_params["app"]
        refused: Response | None = None
        if not _NAME.fullmatch(app):
            refused = _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        elif runs is None:
            refused = _error(404, "not_found", "this node runs no commands")
        else:
            refused = await callers.check(websocket, "run", app)
        if refused is not None or runs is None:
            await websocket.send_denial_response(refused or _error(404, "not_found", "no runs here"))
            return
        await websocket.accept()
        await runs(websocket, app)

    return Starlette(
        routes=[
            Route("/logs/apps/{app}", app_logs, methods=["GET"]),
            Route("/traces/apps/{app}", app_traces, methods=["GET"]),
            WebSocketRoute("/runs/{app}", run),
            Route("/healthz", health, methods=["GET"]),
            Route("/metrics", scrape, methods=["GET"]),
            Route("/metrics/apps/{app}", scrape_app, methods=["GET"]),
            *(volapi.routes(volumes, callers) if volumes is not None else []),
            *(debug.routes(profiler, callers) if profiler is not None else []),
            *(attach.routes(attacher, callers) if attacher is not None else []),
        ]
    )


# Connections at once, and how long one may take to send a request's head (or the next one's):
# past the cap a new connection is answered 503 and closed, so one client cannot take the node's fds.
MAX_CONNECTIONS = 256
HEAD_TIMEOUT_S = 10.0
_BUSY_BODY = json.dumps(
    {"error": {"code": "unavailable", "message": "the node API has too many connections; try again"}}
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Capped(H11Protocol):
    """uvicorn's h11 protocol, with a cap on connections and a time limit on a request's head: uvicorn
    has neither (its keep-alive timeout starts only after a first answer)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > MAX_CONNECTIONS:
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        # No new request (a cycle) by then: the head never came whole; the connection goes.
        waiting_on = self.cycle
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._late, waiting_on)

    def _late(self, waiting_on: object) -> None:
        if self.cycle is waiting_on and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self.transport.is_closing():
            self._arm()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The connection is a websocket's from here on (a run, a debug session), with no request
        # head to wait for: the timer would close it under the websocket 10 s after it opened.
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """Signals are the node's to handle: it stops every part together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class NodeApi:
    """The node API's server: `reserve()` binds its port (0: a free one) so its URL is known before
    the node reports it in its heartbeat; `serve()` runs it."""

    def __init__(
        self,
        *,
        api_url: str,
        logs_dir: Path,
        host: str,
        port: int = 0,
        node: str = "",
        volumes: Volumes | None = None,
        runs: Runner | None = None,
        profiler: debug.Profiler | None = None,
        traces: SpanStore | None = None,
        metrics: Callable[[], bytes] | None = None,
        app_metrics: Callable[[str], Awaitable[bytes]] | None = None,
        attacher: attach.Attacher | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.callers = Callers(api_url, node=node)
        self.app = create_app(
            logs_dir,
            callers=self.callers,
            volumes=volumes,
            runs=runs,
            profiler=profiler,
            metrics=metrics,
            app_metrics=app_metrics,
            traces=traces,
            attacher=attacher,
        )
        self._sock: socket.socket | None = None
        self._server: _Server | None = None

    def reserve(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            # Listening now: a caller that reads the heartbeat's URL before the server runs waits in
            # the backlog instead of being refused.
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(False)
        self.port = sock.getsockname()[1]
        self._sock = sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def serve(self) -> None:
        if self._sock is None:
            self.reserve()
        assert self._sock is not None
        self._server = _Server(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                http=_Capped,
                timeout_graceful_shutdown=2,  # open follows must not hold the node's shutdown
                ws_max_size=runwire.MAX_FRAME,
            )
        )
        await self._server.serve(sockets=[self._sock])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        await self.callers.aclose()
        if self._sock is not None:
            self._sock.close()
