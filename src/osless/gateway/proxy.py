"""HTTP ingress: `/{app}/...` or `Host: {app}.localhost` to the app's web instances, bodies streamed
both ways; `POST /_functions/{app}/{function}` (with an API token) invokes a function.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import unix_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from osless.client import AsyncApi
from osless.gateway.router import Backend, NoBackend, Router
from osless.gateway.traffic import Traffic
from osless.gateway.upstream import Unreachable, UpstreamError

__all__ = ["Gateway"]

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailers",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"expect",  # uvicorn answers the client's 100-continue itself; the instance must not
}
WAIT_FOR_INSTANCE_S = 30.0
WS_MAX_DURATION_S = 3600.0
WS_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_CONCURRENCY_LIMIT = 1000
DEFAULT_MAX_BODY_MB = 10.0
CONNECT_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 60.0
TOKEN_TTL_S, BAD_TOKEN_TTL_S = 60.0, 5.0
TOKEN_CACHE_SIZE = 1024


class _NotSent(Exception):
    """The instance refused the connection (it is stopping, say): the request was not sent at all."""


class _TooLarge(Exception):
    """The streamed request body went past the app's limit."""


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Any:
        nonlocal seen
        msg = await receive()
        seen += len(msg.get("body", b""))
        if seen > limit:
            raise _TooLarge()
        return msg

    return wrapped


class Gateway:
    """The ASGI app of the gateway port."""

    def __init__(self, router: Router, api: AsyncApi, *, base_domain: str = "localhost") -> None:
        self.router = router
        self.api_url = api.base_url
        self.base_domain = base_domain
        self._tokens: dict[str, tuple[bool, float]] = {}
        self._auth_client = httpx.AsyncClient(base_url=api.base_url, timeout=10)
        self.traffic = Traffic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path: str = scope["path"]
        host = _header(scope, b"host").split(":")[0].lower()
        by_host = host.endswith("." + self.base_domain) and host.count(".") == self.base_domain.count(".") + 1
        if scope["type"] == "websocket":
            if by_host:
                await self._websocket(scope, receive, send, host.split(".")[0], path)
            else:
                _, app, rest = [*path.split("/", 2), "", ""][:3]
                await self._websocket(scope, receive, send, app, "/" + rest)
            return
        if by_host:
            await self._web(scope, receive, send, host.split(".")[0], path, prefix="")
            return
        if path == "/_health":
            await _json(send, 200, {"ok": True})
            return
        if path.startswith("/_functions/"):
            await self._function(scope, receive, send, path)
            return
        parts = path.split("/", 2)
        if len(parts) < 2 or not parts[1]:
            await _error(send, 404, "no_app", "route requests as /{app}/... or with Host: {app}.localhost")
            return
        app = parts[1]
        rest = "/" + parts[2] if len(parts) > 2 else "/"
        await self._web(scope, receive, send, app, rest, prefix="/" + app)

    async def _web(
        self, scope: Scope, receive: Receive, send: Send, app: str, path: str, prefix: str
    ) -> None:
        headers = _forward_headers(scope, prefix)
        query = scope.get("query_string", b"")
        target = path + ("?" + query.decode("latin-1") if query else "")

        async def timeout(backend: Backend) -> float | None:
            manifest = await self.router.manifest(backend)
            return float((manifest.get("web") or {}).get("timeout_s", DEFAULT_TIMEOUT_S))

        await self._route(app, scope["method"], target, headers, receive, send, timeout)

    async def _route(
        self,
        app: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
        timeout: Callable[[Backend], Awaitable[float | None]],
    ) -> None:
        """Pick an instance and proxy; one that refuses the connection is passed over for the next."""
        policy = (self.router.apps.items.get(app) or {}).get("autoscale") or {}
        limit = int(policy.get("concurrency_limit", DEFAULT_CONCURRENCY_LIMIT))
        if self.traffic.in_flight(app) >= limit:
            # At once, rather than a queue with no end: the client knows to come back.
            await _error(
                send,
                429,
                "too_many_requests",
                f"app {app!r} is at its limit of {limit} requests in flight; retry shortly",
                retry_after=True,
            )
            return
        max_body = int(float(policy.get("max_body_mb", DEFAULT_MAX_BODY_MB)) * 1024 * 1024)
        length = dict(headers).get(b"content-length", b"")
        if length.isdigit() and int(length) > max_body:
            await _error(
                send, 413, "too_large", f"the request body exceeds {app!r}'s limit of {max_body} bytes"
            )
            return
        try:
            # Read once, here: a request passed over to another instance must not need it again.
            content = await _content(_limited(receive, max_body))
        except _TooLarge:
            await _error(
                send, 413, "too_large", f"the request body exceeds {app!r}'s limit of {max_body} bytes"
            )
            return
        except _ClientGone:
            return
        refused: set[str] = set()
        reason = ""
        for _ in range(CONNECT_ATTEMPTS):
            try:
                with self.traffic.waiting(app):
                    backend = await self.router.pick(app, WAIT_FOR_INSTANCE_S, exclude=frozenset(refused))
                seconds = await timeout(backend)
            except NoBackend as e:
                await _error(send, e.status, e.code, e.message, retry_after=e.status == 503)
                return
            if seconds is None:
                return  # `timeout` answered the request itself
            try:
                with self.traffic.serving(app):
                    await self._proxy(backend, method, target, headers, content, send, seconds)
                return
            except _NotSent as e:
                refused.add(backend.id)
                reason = str(e)
            except _ClientGone:
                return  # nobody to answer; the instance's connection was dropped with the body unfinished
            except _TooLarge:
                await _error(
                    send, 413, "too_large", f"the request body exceeds {app!r}'s limit of {max_body} bytes"
                )
                return
        await _error(send, 502, "bad_gateway", f"no instance of {app!r} accepted the connection: {reason}")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, app: str, path: str) -> None:
        """Relay a websocket to an instance, message by message, until either side closes."""
        try:
            backend = await self.router.pick(app, WAIT_FOR_INSTANCE_S)
        except NoBackend:
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        if (await receive())["type"] != "websocket.connect":
            return
        query = scope.get("query_string", b"").decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in HOP_BY_HOP and not k.startswith(b"sec-websocket-")
        ]
        try:
            upstream = await unix_connect(
                backend.socket,
                f"ws://{app}{path}" + (f"?{query}" if query else ""),
                additional_headers=headers,
                subprotocols=scope.get("subprotocols") or None,
                open_timeout=10,
                max_size=WS_MAX_MESSAGE,
            )
        except (OSError, TimeoutError, WebSocketException):
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def inbound() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await upstream.send(msg["text"])
                elif msg.get("bytes") is not None:
                    await upstream.send(msg["bytes"])

        async def outbound() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for data in upstream:
                    key = "text" if isinstance(data, str) else "bytes"
                    await send({"type": "websocket.send", key: data})

        with self.traffic.serving(app):
            tasks = [asyncio.create_task(inbound()), asyncio.create_task(outbound())]
            # Idle connections live on; none outlives the maximum duration.
            await asyncio.wait(tasks, timeout=WS_MAX_DURATION_S, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await upstream.close()
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": upstream.close_code or 1000})

    async def _function(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        parts = path.split("/")
        if len(parts) != 4 or scope["method"] != "POST":
            await _error(send, 404, "not_found", "invoke functions with POST /_functions/{app}/{function}")
            return
        if not await self._authorized(_header(scope, b"authorization")):
            await _error(
                send, 401, "unauthorized", "invoking a function needs 'Authorization: Bearer <token>'"
            )
            return
        _, _, app, function = parts

        async def timeout(backend: Backend) -> float | None:
            spec = ((await self.router.manifest(backend)).get("functions") or {}).get(function)
            if spec is None:
                await _error(send, 404, "unknown_function", f"app {app!r} has no function {function!r}")
                return None
            # The instance applies the function's timeout_s itself and answers 504; the extra
            # second covers the trip back. A caller's own x-osless-deadline passes through.
            return float(spec.get("timeout_s", DEFAULT_TIMEOUT_S)) + 1

        headers = [(k, v) for k, v in _forward_headers(scope, "") if k != b"authorization"]
        await self._route(app, "POST", f"/__osless__/invoke/{function}", headers, receive, send, timeout)

    async def _proxy(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
        send: Send,
        timeout: float,
    ) -> None:
        async with self.router.use(backend):
            try:
                resp = await backend.upstream.request(method, target, headers, content, timeout)
            except Unreachable as e:
                raise _NotSent(str(e)) from e  # nothing was sent: another instance may take it
            except TimeoutError:
                await _error(
                    send, 504, "timeout", f"instance {backend.id} did not answer within {timeout:.0f}s"
                )
                return
            except (UpstreamError, OSError) as e:
                await _error(send, 502, "bad_gateway", f"instance {backend.id} failed before answering: {e}")
                return
            try:
                out = [(k, v) for k, v in resp.headers if k.lower() not in HOP_BY_HOP]
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                try:
                    async for chunk in resp.body():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except (UpstreamError, OSError):
                    pass  # the instance died mid-body: end what we have; the client sees a short body
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                resp.release()

    async def _authorized(self, header: str) -> bool:
        now = time.monotonic()
        cached = self._tokens.get(header)
        if cached and cached[1] > now:
            return cached[0]
        if not header.lower().startswith("bearer "):
            return False
        try:
            resp = await self._auth_client.get("/v1/whoami", headers={"authorization": header})
            # An app's own token opens its config and endpoints, never another app's functions.
            ok = resp.status_code == 200 and resp.json().get("role") != "app"
        except (httpx.HTTPError, ValueError):
            return False
        self._tokens[header] = (ok, now + (TOKEN_TTL_S if ok else BAD_TOKEN_TTL_S))
        while len(self._tokens) > TOKEN_CACHE_SIZE:  # callers with made-up tokens cannot grow it
            self._tokens.pop(next(iter(self._tokens)))
        return ok

    async def aclose(self) -> None:
        await self._auth_client.aclose()


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return ""


def _forward_headers(scope: Scope, prefix: str) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP or k == b"host"]
    client = scope.get("client")
    headers.append((b"x-forwarded-for", (client[0] if client else "").encode()))
    headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode()))
    headers.append((b"x-forwarded-host", _header(scope, b"host").encode("latin-1")))
    if prefix:
        headers.append((b"x-forwarded-prefix", prefix.encode()))
    return headers


async def _content(receive: Receive) -> bytes | AsyncIterator[bytes]:
    """The request body: as bytes when it came in one piece (most requests: no chunked framing, no
    generator), else streamed on as it comes."""
    first = await receive()
    if first["type"] == "http.disconnect":
        raise _ClientGone()
    if not first.get("more_body", False):
        return bytes(first.get("body", b""))

    async def rest() -> AsyncIterator[bytes]:
        yield bytes(first.get("body", b""))
        async for chunk in _body(receive):
            yield chunk

    return rest()


class _ClientGone(Exception):
    """The client left before its body was whole: the instance must not get a cut-off one as complete."""


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        body = msg.get("body", b"")
        if body:
            yield body
        if not msg.get("more_body", False):
            return


async def _json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _error(send: Send, status: int, code: str, message: str, retry_after: bool = False) -> None:
    extra = [(b"retry-after", b"1")] if retry_after else []
    await _json(send, status, {"error": {"code": code, "message": message}}, extra)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
