"""HTTP ingress: `/{app}/...` or `Host: {app}.localhost` to the app's web instances, bodies streamed
both ways; `POST /_functions/{app}/{function}` invokes a function: with a token the API says may
(the API decides, the gateway keeps its answer a second), or without one if the function is public
(`@app.function(public=True)`), rate-limited per client address.

Routing, limits and the activator live here, one coroutine per request; the bytes move in
`gateway.http` (the client's side) and `gateway.upstream` (the instance's).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Sequence

import httptools
import httpx

from osless import tokens
from osless.api.ratelimit import Buckets, Rate
from osless.client import AsyncApi
from osless.contracts import FUNCTION_NAME_PATTERN, ImageManifest
from osless.gateway.cookies import SESSION_COOKIE, without_session
from osless.gateway.http import ClientConnection, ClientGone, Request, TooLarge, error_response
from osless.gateway.metrics import Metrics
from osless.gateway.router import Backend, NoBackend, Router, Timeouts, web_timeouts
from osless.gateway.traffic import AppTraffic, Traffic
from osless.gateway.upstream import BadAnswer, OnDone, Unreachable, UpstreamConn, UpstreamError
from osless.sdk import traceparent

__all__ = ["Gateway"]

# Not passed on: they describe the client's connection, not the request (or the gateway answers
# them itself: Expect), and the gateway's own x-forwarded-* replace whatever the client sent.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailers",
        b"upgrade",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
    }
)
# The caller's token stays with the gateway; whether the call is public is the gateway's to say.
PUBLIC = b"x-osless-public"
NOT_TO_FUNCTIONS = HOP_BY_HOP | {b"authorization", PUBLIC}
HOSTS_REMEMBERED = 1024
# Instances used to serve the platform's endpoints under this prefix; they now have a socket of
# their own, and the gateway still refuses the prefix, so no app can be reached through it either.
INTERNAL = b"/__osless__"
JSON = [(b"content-type", b"application/json")]
RETRY_AFTER = [*JSON, (b"retry-after", b"1")]
WAIT_FOR_INSTANCE_S = 30.0
TUNNEL_IDLE_S = 600.0  # a websocket with no byte either way for this long is closed
# A request that failed on one instance before any byte of its answer goes to another, when
# nothing was sent (the connection was refused) or it may be sent twice (`_replayable`): at most
# this many tries, none starting later than this after the first failure.
MAX_TRIES = 3
RETRY_WITHIN_S = 10.0
SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))
TOKEN_TTL_S, BAD_TOKEN_TTL_S = 1.0, 1.0  # a revoked token stops here within TOKEN_TTL_S, as at the API
TOKEN_CACHE_SIZE = 1024
# Calls of public functions (no token) per client address, per gateway process: a token bucket.
PUBLIC_RATE = Rate(per_s=10.0, burst=20.0)
PUBLIC_CLIENTS_REMEMBERED = 10_000
# Of the traces a gateway starts, the share recorded past the first of each second. 1%: a recorded
# request costs its instance ~60-90 us more (benchmarks/metrics.py), so 5% cost every answer ~4.5 us.
DEFAULT_TRACE_SAMPLE = 0.01
# The API's tokens a gateway takes: kept ones, an app's own, and the API's for its own calls.
TOKEN_PREFIXES = (tokens.PLAIN, tokens.APP, tokens.SCOPED["invoker"])
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.~+/=-]{1,512}")  # what any of them is made of
FUNCTION_NAME = re.compile(FUNCTION_NAME_PATTERN)

# The timeouts of a request to an instance of a release, from its manifest; None
# when there is nothing to ask it (the function answered the request itself).
TimeoutsOf = Callable[[ImageManifest], Timeouts | None]


class Gateway:
    """The gateway port: `listen()` serves it; `handle` is each request's coroutine."""

    def __init__(
        self,
        router: Router,
        api: AsyncApi,
        *,
        name: str = "gateway",
        base_domain: str = "localhost",
        trace_sample: float = DEFAULT_TRACE_SAMPLE,
    ) -> None:
        self.router = router
        self.sample = traceparent.Sampler(trace_sample)  # which traces it starts are recorded
        self.name = name
        # Which of the node's gateway processes answered (the kernel picks one per connection); the
        # process's own name (gw-<k>), not the node's, which is no business of the internet's.
        self._health_headers = [*JSON, (b"x-osless-gateway", name.encode("ascii"))]
        self.api_url = api.base_url
        self.base_domain = base_domain
        # (Authorization header, app, function) -> (None if allowed, else the refusal to give; until)
        self._tokens: dict[tuple[str, str, str], tuple[tuple[int, bytes] | None, float]] = {}
        self._public_rate = Buckets(PUBLIC_RATE, size=PUBLIC_CLIENTS_REMEMBERED)
        self._auth_client = httpx.AsyncClient(base_url=api.base_url, timeout=10)
        # On the loop's clock, which the hot path reads anyway (one clock read a turn of the loop).
        self.traffic = Traffic(asyncio.get_running_loop().time)
        self.metrics = Metrics()  # for the node's /metrics (gateway/metrics.py)
        self.connections: set[ClientConnection] = set()
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host_suffix = "." + base_domain
        self._host_dots = base_domain.count(".") + 1
        self._hosts: dict[bytes, str] = {}  # Host header -> the app it names ("" for none)

    async def listen(self, sockets: Sequence[socket.socket]) -> None:
        """Serve on bound sockets (one per address of the host); they listen from here on."""
        self._loop = loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(self._connection, sock=sock, backlog=2048))

    def _connection(self) -> ClientConnection:
        assert self._loop is not None
        conn = ClientConnection(self.handle, self._loop, self.fast)
        self.connections.add(conn)
        conn.on_close = self.connections.discard
        return conn

    def _where(self, req: Request) -> tuple[str, str, bytes, bytes]:
        """(what, app, target, prefix): what is "web" (app, its target, the prefix taken off the
        path), "internal" (a path of the platform's), "health", "function", "bad_url" or "no_app"."""
        url = req.url
        if not url.startswith(b"/"):  # absolute-form, as a forward proxy sends it
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                return "bad_url", "", b"", b""
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            app = self._app_of_host(parsed.host or b"")
        else:
            known = self._hosts.get(req.host)  # `_app_of_host`'s own first step, without the call
            app = self._app_of_host(req.host) if known is None else known
        if app:
            return ("internal" if url.startswith(INTERNAL) else "web"), app, url, b""
        path, sep, query = url.partition(b"?")
        if path == b"/_health":
            return "health", "", b"", b""
        if path.startswith(b"/_functions/"):
            return "function", "", path, b""
        end = path.find(b"/", 1)  # /{app}/rest: the app's name ends at the second slash, if any
        prefix, rest = (path, b"/") if end < 0 else (path[:end], path[end:])
        if len(prefix) < 2:
            return "no_app", "", b"", b""
        what = "internal" if rest.startswith(INTERNAL) else "web"
        return what, prefix[1:].decode("latin-1"), rest + sep + query if sep else rest, prefix

    def _app_of_host(self, host: bytes) -> str:
        """The app a Host header names ({app}.localhost, any port), "" if none; remembered."""
        app = self._hosts.get(host)
        if app is None:
            name = host.decode("latin-1").rsplit(":", 1)[0].lower()
            named = name.endswith(self._host_suffix) and name.count(".") == self._host_dots
            app = name.split(".", 1)[0] if named else ""
            if len(self._hosts) >= HOSTS_REMEMBERED:  # made-up hosts cannot grow it
                self._hosts.clear()
            self._hosts[host] = app
        return app

    def fast(self, conn: ClientConnection, req: Request) -> bool:
        """The common case without a coroutine: a plain request for an app with a ready instance
        and an idle connection to it. Anything else, or any doubt, goes to `handle`."""
        if req.upgrade or req.expect:
            return False
        what, app, target, prefix = self._where(req)
        if what != "web":
            return False
        router = self.router
        limit, max_body = router.limits(app)
        counts = self.traffic.apps.get(app)
        if counts is not None and counts.in_flight + counts.waiting >= limit:
            return False
        if (req.content_length or req.body_bytes) and _over(req, max_body):
            return False
        backend = router.pick_now(app)
        if backend is None or backend.web_timeouts is None:
            return False
        up = backend.upstream.take_idle()
        if up is None:
            return False
        req.limit = max_body
        exchange = _Exchange(self, conn, req, backend, up, backend.web_timeouts)
        try:
            exchange.start(_head(conn, req, target, prefix, self.sample), exchange.settle_fast)
        except Exception as e:  # a bug: answered as one (500), with nothing left counted
            exchange.settle()
            conn.finished(e)
        return True

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        what, app, target, prefix = self._where(req)
        if what == "web":
            await self._web(conn, req, app, target, prefix)
        elif what == "health":
            conn.respond(200, json.dumps(self.router.health()).encode(), self._health_headers)
        elif what == "function":
            await self._function(conn, req, target)
        elif what == "internal":
            message = "paths under /__osless__/ are the platform's own and never reach an app"
            conn.respond(404, error_response("not_found", message), JSON)
        elif what == "bad_url":
            conn.respond(400, error_response("bad_request", "the request target is not a URL"), JSON, True)
        else:
            message = "route requests as /{app}/... or with Host: {app}.localhost"
            conn.respond(404, error_response("no_app", message), JSON)

    async def _web(
        self, conn: ClientConnection, req: Request, app: str, target: bytes, prefix: bytes
    ) -> None:
        await self._route(conn, req, app, _head(conn, req, target, prefix, self.sample), web_timeouts)

    async def _function(self, conn: ClientConnection, req: Request, path: bytes) -> None:
        parts = path.split(b"/")
        if len(parts) != 4 or req.method != b"POST":
            conn.respond(
                404,
                error_response("not_found", "invoke functions with POST /_functions/{app}/{function}"),
                JSON,
            )
            return
        app, function = parts[2].decode("latin-1"), parts[3].decode("latin-1")
        if app not in self.router.apps.items:
            message = f"no app named {app!r} is deployed here"
            conn.respond(404, error_response("app_not_found", message), JSON)
            return
        if not FUNCTION_NAME.fullmatch(function):  # before it goes into a URL of the API's
            message = f"{function[:80]!r} is not a function name (letters, digits and _)"
            conn.respond(404, error_response("unknown_function", message), JSON)
            return
        header = req.header(b"authorization").decode("latin-1")
        if header:
            refused = await self._refusal(header, app, function)
            if refused is not None:
                status, body = refused
                conn.respond(status, body, RETRY_AFTER if status in (429, 503) else JSON)
                return
        elif not await self._public(app, function):
            message = (
                f"invoking {app}.{function} needs 'Authorization: Bearer <token>' with a token that may "
                f"invoke it (`osless tokens create --role invoke --functions {app}.{function}`); or make "
                "it public with @app.function(public=True)"
            )
            conn.respond(
                401, error_response("unauthorized", message), [*JSON, (b"www-authenticate", b"Bearer")]
            )
            return
        elif wait := self._public_rate.take(conn.client_ip.decode("latin-1")):
            retry = Buckets.retry_after(wait)
            message = (
                f"too many calls of public functions from this address (at most {PUBLIC_RATE.per_s:g}/s, "
                f"bursts of {PUBLIC_RATE.burst:g}); retry in {retry} s, or call with a token"
            )
            conn.respond(
                429, error_response("too_many_requests", message), [*JSON, (b"retry-after", retry.encode())]
            )
            return

        def timeouts(manifest: ImageManifest) -> Timeouts | None:
            spec = manifest.functions.get(function)
            if spec is None:
                message = f"app {app!r} has no function {function!r}"
                conn.respond(404, error_response("unknown_function", message), JSON)
                return None
            # The instance applies the function's timeout_s itself and answers 504; the extra
            # second covers the trip back. A caller's own x-osless-deadline passes through.
            seconds = float(spec.timeout_s) + 1
            return Timeouts(seconds, seconds)

        head = _head(conn, req, b"/invoke/" + parts[3], b"", self.sample, NOT_TO_FUNCTIONS)
        if not header:  # a stranger's call: the instance keeps the function's error to its log
            head = head[:-2] + PUBLIC + b": 1\r\n\r\n"
        await self._route(conn, req, app, head, timeouts, control=True)

    async def _route(
        self,
        conn: ClientConnection,
        req: Request,
        app: str,
        head: bytes,
        timeouts_of: TimeoutsOf,
        control: bool = False,
    ) -> None:
        """Limits first, then an instance and a connection to it (its control socket for a function
        call), then the exchange."""
        if app not in self.router.apps.items:
            # Before anything is counted: names strangers make up must not grow the traffic figures.
            message = f"no app named {app!r} is deployed here"
            conn.respond(404, error_response("app_not_found", message), JSON)
            return
        limit, max_body = self.router.limits(app)
        if self.traffic.in_flight(app) >= limit:
            # At once, rather than a queue with no end: the client knows to come back.
            message = f"app {app!r} is at its limit of {limit} requests in flight; retry shortly"
            conn.respond(429, error_response("too_many_requests", message), RETRY_AFTER)
            return
        req.limit = max_body
        if _over(req, max_body):
            message = f"the request body exceeds {app!r}'s limit of {max_body} bytes"
            conn.respond(413, error_response("too_large", message), JSON, close=True)
            return
        if not req.complete and req.expect.lower() == b"100-continue":
            conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await self._send(conn, req, app, head, timeouts_of, control, _Tries())

    async def _send(
        self,
        conn: ClientConnection,
        req: Request,
        app: str,
        head: bytes,
        timeouts_of: TimeoutsOf,
        control: bool,
        tries: _Tries,
    ) -> None:
        """An instance, a connection to it, the exchange; again on another instance while what
        failed may be tried again (`_Tries`)."""
        while True:
            # Counted from here (the autoscaler sees a crowd at once, not as connections open), and
            # in flight once its exchange starts.
            with self.traffic.waiting(app):
                found = await self._connect(conn, app, req.upgrade, timeouts_of, control, tries)
            if found is None or not await self._exchange(_Exchange(self, conn, req, *found), head, tries):
                return

    async def _connect(
        self,
        conn: ClientConnection,
        app: str,
        upgrade: bool,
        timeouts_of: TimeoutsOf,
        control: bool,
        tries: _Tries,
    ) -> tuple[Backend, UpstreamConn, Timeouts] | None:
        """An instance (waiting while one starts) and a connection to it; one that refuses the
        connection is passed over for the next. None if the request was answered here instead."""
        router = self.router
        loop = conn.loop
        while True:
            try:
                # At once when an instance is ready (the common case); else the activator's wait.
                ready = app in router.apps.items
                backend = router.pick_now(app, tries.refused) if ready else None
                if backend is None:
                    backend = await router.pick(app, tries.wait(loop.time()), exclude=tries.refused)
                manifest = await router.manifest(backend)
                timeouts = timeouts_of(manifest)
            except NoBackend as e:
                if tries.reason and e.status == 504:  # no other instance to retry on in time
                    message = f"no instance of {app!r} took the request: {tries.reason}"
                    conn.respond(502, error_response("bad_gateway", message), JSON)
                else:
                    conn.respond(
                        e.status, error_response(e.code, e.message), RETRY_AFTER if e.status == 503 else JSON
                    )
                return None
            if timeouts is None:
                return None  # `timeouts_of` answered the request itself
            try:
                up = await (backend.control if control else backend.upstream).acquire(fresh=upgrade)
            except Unreachable as e:
                # Nothing was sent: another instance may take it, whatever the request.
                if tries.failed(backend, str(e), loop.time()):
                    continue
                message = f"no instance of {app!r} accepted the connection: {e}"
                conn.respond(502, error_response("bad_gateway", message), JSON)
                return None
            return backend, up, timeouts

    async def _exchange(self, exchange: _Exchange, head: bytes, tries: _Tries) -> bool:
        """The request relayed to the instance, and its answer back; True if it failed in a way
        that lets another instance take it (`tries` then knows why), the client told nothing."""
        done = exchange.conn.loop.create_future()

        def on_done(_: BaseException | None) -> None:
            if not done.done():
                done.set_result(None)

        retry = False
        try:
            exchange.start(head, on_done)
            await done
            retry = exchange.retry(tries)
        finally:
            # Also when the client left.
            upgraded = exchange.settle(tunnel_ok=exchange.req.upgrade, retrying=retry)
        if upgraded:
            try:
                await self._tunnel(exchange)
            finally:
                exchange.end()
        return retry

    async def _tunnel(self, exchange: _Exchange) -> None:
        """A websocket (any 101): bytes both ways until either side closes, it idles, or it is
        older than the app's max_duration_s."""
        conn, up, ends = exchange.conn, exchange.up, exchange.ends
        loop = conn.loop
        conn.start_tunnel(up)
        try:
            while not conn.closed and not up.lost:
                now = loop.time()
                last = max(up.last_data, conn.last_data)
                if now >= ends or now - last >= TUNNEL_IDLE_S:
                    break
                await asyncio.wait([conn.lost], timeout=min(ends, last + TUNNEL_IDLE_S) - now)
        finally:
            if up.transport is not None:
                up.transport.close()
            conn.transport.close()

    async def _public(self, app: str, function: str) -> bool:
        """Whether the app's current release declares `function` with public=True."""
        try:
            manifest = await self.router.current_manifest(app)
        except NoBackend:
            return False
        spec = None if manifest is None else manifest.functions.get(function)
        return spec is not None and bool(spec.public)

    async def _refusal(self, header: str, app: str, function: str) -> tuple[int, bytes] | None:
        """None if the token in `header` may invoke `app.function`; else the answer to give. The API
        decides (`GET /v1/apps/{app}/functions/{function}/access`, the same check as an invoke),
        and its answer is kept a second, refusals too."""
        now = time.monotonic()
        key = (header, app, function)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if (
            scheme.lower() != "bearer"
            or not token.startswith(TOKEN_PREFIXES)
            or not TOKEN_CHARS.fullmatch(token)
        ):
            # Not a token of ours: not worth asking the API.
            message = "the Authorization header holds no osless token: send 'Authorization: Bearer <token>'"
            return 401, error_response("unauthorized", message)
        try:
            resp = await self._auth_client.get(
                f"/v1/apps/{app}/functions/{function}/access", headers={"authorization": f"Bearer {token}"}
            )
        except httpx.HTTPError as e:
            return 503, error_response("api_unreachable", f"cannot check the token with the API now: {e}")
        if resp.status_code == 200:
            answer: tuple[int, bytes] | None = None
        elif resp.status_code in (401, 403, 404) and _is_error(resp.content):
            answer = resp.status_code, resp.content  # the API's own words: what is missing, and how to fix it
        else:  # the API could not say (429, 5xx): refused now, asked again next time
            return 503, error_response(
                "api_unavailable", f"cannot check the token with the API now ({resp.status_code})"
            )
        self._tokens[key] = (answer, now + (TOKEN_TTL_S if answer is None else BAD_TOKEN_TTL_S))
        while len(self._tokens) > TOKEN_CACHE_SIZE:  # callers with made-up tokens cannot grow it
            self._tokens.pop(next(iter(self._tokens)))
        return answer

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.transport.close()
        await self._auth_client.aclose()


class _TimedOut(Exception):
    """No byte of the answer within the app's timeout."""


class _TooOld(Exception):
    """The request lived past the app's max_duration_s."""


def _is_error(body: bytes) -> bool:
    """Whether `body` is the API's error shape, fit to hand on as it is."""
    try:
        found = json.loads(body)
    except ValueError:
        return False
    return isinstance(found, dict) and isinstance(found.get("error"), dict)


def _over(req: Request, max_body: int) -> bool:
    """The body is past `max_body`, by what it says of itself or by what came of it so far."""
    length = req.content_length
    return (length.isdigit() and int(length) > max_body) or req.body_bytes > max_body


def _head(
    conn: ClientConnection,
    req: Request,
    target: bytes,
    prefix: bytes,
    sample: traceparent.Sampler,
    drop: frozenset[bytes] = HOP_BY_HOP,
) -> bytes:
    """The request's head as the instance gets it: its target, the client's headers but `drop`,
    and the gateway's x-forwarded-* (with the prefix taken off the path, if any)."""
    parts = [req.method, b" ", target, _VERSIONS.get(req.version) or b" HTTP/%s\r\n" % req.version.encode()]
    trace = state = b""
    for kv in req.headers:
        name = kv[0]
        # WSGI reads `x_forwarded_for` as `x-forwarded-for` (both are HTTP_X_FORWARDED_FOR): such a
        # spelling of a dropped header is dropped too.
        if name in drop or (b"_" in name and name.replace(b"_", b"-") in drop):
            continue
        if name in _TRACE_CONTEXT:  # the client's: checked below, never passed on unchecked
            if name == b"tracestate":
                state = kv[1]
            else:
                trace = b"-" if trace else kv[1]  # two traceparents: neither is continued
            continue
        if name == b"cookie" and SESSION_COOKIE in kv[1]:
            kept = without_session(kv[1])
            if kept:
                parts += (name, b": ", kept, b"\r\n")
            continue
        parts += (name, b": ", kv[1], b"\r\n")
    # W3C Trace Context: continue a valid traceparent (and its tracestate), else start a new trace.
    if trace and traceparent.valid(trace):
        parts += (b"traceparent: ", trace, b"\r\n")
        if state:
            parts += (b"tracestate: ", state, b"\r\n")
    else:
        parts += (b"traceparent: ", traceparent.new(sample()), b"\r\n")
    if req.upgrade:
        parts.append(b"connection: upgrade\r\nupgrade: %s\r\n" % req.header(b"upgrade"))
    # The x-forwarded-* block: the same for each request of a connection to one host and prefix.
    host, block = req.host, conn.forwarded
    if block is None or block[0] != host or block[1] != prefix:
        lines = b"x-forwarded-for: %s\r\nx-forwarded-proto: http\r\nx-forwarded-host: %s\r\n" % (
            conn.client_ip,
            host,
        )
        if prefix:
            lines += b"x-forwarded-prefix: %s\r\n" % prefix
        block = conn.forwarded = (host, prefix, lines + b"\r\n")
    parts.append(block[2])
    return b"".join(parts)


_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})
_VERSIONS = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}


class _Exchange:
    """One request relayed to one instance: its deadline, its count in the traffic, its outcome."""

    __slots__ = ("backend", "conn", "counts", "ends", "gateway", "head", "req", "timeouts", "up")

    def __init__(
        self,
        gateway: Gateway,
        conn: ClientConnection,
        req: Request,
        backend: Backend,
        up: UpstreamConn,
        timeouts: Timeouts,
    ) -> None:
        self.gateway = gateway
        self.conn = conn
        self.req = req
        self.backend = backend
        self.up = up
        self.timeouts = timeouts
        self.ends = conn.loop.time() + timeouts.whole
        self.head = b""
        self.counts: AppTraffic | None = None  # once started

    def start(self, head: bytes, on_done: OnDone) -> None:
        up, conn, req = self.up, self.conn, self.req
        self.head = head  # kept: sent again to another instance, if this one fails it
        now = conn.loop.time()
        self.counts = self.gateway.traffic.of(self.backend.app)
        self.counts.start(now)
        self.backend.outstanding += 1
        up.begin(conn, req.method == b"HEAD", on_done)
        up.write(head)
        conn.attach(up)
        req.attach(up)
        # `idle` bounds the wait for each byte of the answer: a stream that keeps sending lives
        # on, until it is `whole` seconds old.
        conn.deadline = self._due
        conn.watch_until(min(now + self.timeouts.idle, self.ends))

    def _due(self, now: float) -> float | None:
        """The connection's watchdog asks: time out the answer if it is overdue."""
        up = self.up
        if up.ended:
            return None
        if now >= self.ends:
            up.fail(_TooOld())
            return None
        if self.conn.write_paused or up.reading_paused:
            up.last_data = now  # the client is the slow one: the instance is not to blame
        due = up.last_data + self.timeouts.idle
        if now >= due:
            up.fail(_TimedOut())
            return None
        return min(due, self.ends)

    def settle(self, tunnel_ok: bool = False, retrying: bool = False) -> bool:
        """Answer for what went wrong, if anything (unless `retrying`: another instance will), and
        hand the instance's connection back; True if it became a tunnel (the caller relays it,
        then calls `end`)."""
        conn, req, up = self.conn, self.req, self.up
        conn.deadline = None
        req.detach()
        conn.detach()
        tunnel = False
        try:
            # Not ended: the coroutine was cancelled, because the client left.
            error = up.error if up.ended else ClientGone()
            if error is None and up.upgraded and not tunnel_ok:
                error = UpstreamError("the instance switched protocols on a request that did not ask")
            if isinstance(error, _TimedOut | _TooOld):
                up.abort()
                if up.started:
                    conn.must_close = True  # cut mid-answer: the client sees it end short
                else:
                    if isinstance(error, _TimedOut):
                        message = f"instance {self.backend.id} did not answer within {self.timeouts.idle:g}s"
                    else:
                        whole = self.timeouts.whole
                        message = f"the request outlived the app's max_duration_s of {whole:g}s"
                    conn.respond(504, error_response("timeout", message), JSON, close=not req.complete)
            elif isinstance(error, TooLarge):
                up.abort()
                message = f"the request body exceeds {self.backend.app!r}'s limit of {req.limit} bytes"
                conn.respond(413, error_response("too_large", message), JSON, close=True)
                conn.must_close = True
            elif error is not None:
                if up.started:
                    conn.must_close = True  # the instance died mid-answer (or the client left)
                    up.abort()
                elif not retrying:
                    message = f"instance {self.backend.id} failed before answering: {error}"
                    conn.respond(502, error_response("bad_gateway", message), JSON, close=not req.complete)
            elif up.upgraded:
                tunnel = True
            elif not req.complete:
                up.keep_alive = False  # answered before the body ended: the instance may still read it
            elif not up.keep_alive:
                conn.must_close = True  # the answer said `connection: close`, and the client heard it
        finally:
            if not tunnel:
                up.pool.release(up)
                self.end()
        return tunnel

    def end(self) -> None:
        self.backend.outstanding -= 1
        now = self.conn.loop.time()
        self.gateway.metrics.end(self, now)
        if self.counts is not None:
            self.counts.end(now)

    def settle_fast(self, error: BaseException | None) -> None:
        up = self.up
        if error is None and not up.upgraded and self.req.complete:
            # The common end, whole and in time: `settle`'s last branch, without its questions.
            conn = self.conn
            conn.deadline = None
            self.req.sink = None
            conn.detach()
            if not up.keep_alive:
                conn.must_close = True  # the answer said `connection: close`, and the client heard it
            up.pool.release(up)
            self.end()
            conn.finished(None)
            return
        tries = None if error is None else _Tries()  # none made for an answer that came whole
        if tries is not None and self.retry(tries):
            self.settle(retrying=True)
            # On another instance, in a coroutine (it may have to wait for one).
            gateway, conn = self.gateway, self.conn
            conn.run(gateway._send(conn, self.req, self.backend.app, self.head, web_timeouts, False, tries))
            return
        self.settle()  # never a tunnel: upgrades take the coroutine
        self.conn.finished(None)

    def retry(self, tries: _Tries) -> bool:
        """Whether the request goes to another instance after this exchange (noted in `tries`):
        the instance broke it before a byte of its answer, and the request may be sent twice."""
        up, conn = self.up, self.conn
        error = up.error
        return (
            up.ended
            and isinstance(error, UpstreamError)
            and not isinstance(error, BadAnswer)
            and not up.started
            and not conn.responded
            and not conn.closed
            and _replayable(self.req)
            and tries.failed(
                self.backend, f"instance {self.backend.id} failed before answering: {error}", conn.loop.time()
            )
        )


class _Tries:
    """The instances one request tried, and why the last failed. Another try follows a failure only
    while the request has had fewer than `MAX_TRIES` and the first failure is under
    `RETRY_WITHIN_S` old; it waits for a ready instance no longer than that either."""

    __slots__ = ("count", "reason", "refused", "until")

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""
        self.refused: frozenset[str] = frozenset()  # the sockets of the instances that failed it
        self.until: float | None = None

    def failed(self, backend: Backend, reason: str, now: float) -> bool:
        """`backend` failed the request for `reason`: True if another instance may be tried."""
        self.count += 1
        self.reason = reason
        self.refused |= {backend.socket}
        if self.until is None:
            self.until = now + RETRY_WITHIN_S
        return self.count < MAX_TRIES and now < self.until

    def wait(self, now: float) -> float:
        """How long the next pick may wait for a ready instance."""
        return WAIT_FOR_INSTANCE_S if self.until is None else max(0.0, self.until - now)


def _replayable(req: Request) -> bool:
    """Whether the request may reach an app twice: a safe method (RFC 9110 9.2.1), and no body, so
    nothing that went out must be kept to send again."""
    return (
        req.method in SAFE_METHODS
        and req.complete
        and not req.coded
        and req.content_length in (b"", b"0")
        and req.body_bytes == 0
    )
