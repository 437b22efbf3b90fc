"""The node's relay: how another node's gateway reaches an instance running here.

A TCP listener on the node's address. A peer opens a connection and says one line
(`relaywire`): a gateway token (what every node gives its gateway processes), an instance id, and
which of its sockets. The relay asks the API whether the token is a gateway's (cached a moment, by
the token's digest), checks that the instance
runs here and is ready, connects to its unix socket with the same SO_PEERCRED check the gateway
makes, answers `OK`, and from then on moves bytes both ways, with backpressure, until either side
closes. Nothing reaches an instance through it without a gateway token. Tokens travel in clear (nodes
share a private network; TLS is later work) and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import httpx

from osless import relaywire, tokens
from osless.node.supervisor import Supervisor
from osless.peercred import PeerMismatch, check_peer

__all__ = ["Local", "Lookup", "Relay", "supervised"]

log = logging.getLogger("osless.node.relay")

PREAMBLE_TIMEOUT_S = 5.0
# Both under the 2 s a gateway waits for the relay's answer (gateway.upstream): a slow instance is
# refused as itself (`unreachable`), and a slow API is "cannot say" (a token seen good stays good),
# rather than the gateway taking the whole node for down.
CONNECT_TIMEOUT_S = 1.0
ASK_TIMEOUT_S = 1.5
# Connections at once: past these a new one is refused at once (`ERR busy`), so that a peer cannot
# take every fd of the node. Those still opening (no preamble checked yet: anyone's) have a tighter
# cap than those relaying (a gateway token's), each of which holds two fds.
MAX_OPENING = 128
MAX_CONNECTIONS = 4096
TOKEN_TTL_S = 2.0  # a revoked gateway token stops opening connections here within this
STALE_OK_S = 600.0  # while the API cannot answer, a gateway token it said yes to within this stays good
# A 429 is an answer the API could give because someone flooded it with made-up tokens from here: a
# token said good before stays good only a moment past its cache, or a revoked one would live on.
THROTTLED_OK_S = 10.0
TOKEN_CACHE_SIZE = 1024
THROTTLED = "throttled"
TOKEN_PREFIX = tokens.PLAIN  # what the API's tokens look like: anything else is not worth asking about


class Local(NamedTuple):
    """A ready instance of this node, as its supervisor knows it."""

    web: str
    control: str
    peer: tuple[int, int]  # (pid, uid) that must listen on both sockets


# An instance id -> the instance, if it runs on this node and is ready.
Lookup = Callable[[str], Local | None]


def supervised(supervisors: Mapping[str, Supervisor]) -> Lookup:
    """The lookup into the node agent's own supervisors: what runs here, as it is now."""

    def lookup(instance: str) -> Local | None:
        sup = supervisors.get(instance)
        if sup is None:
            return None
        status = sup.status
        web, control, pid, uid = (status.get(k) for k in ("socket", "control", "pid", "uid"))
        if status.get("phase") != "ready" or not web or not control or pid is None or uid is None:
            return None
        return Local(str(web), str(control), (int(pid), int(uid)))

    return lookup


class Relay:
    def __init__(self, api_url: str, lookup: Lookup, *, node: str) -> None:
        self.lookup = lookup
        self.node = node
        self._auth = httpx.AsyncClient(base_url=api_url, timeout=ASK_TIMEOUT_S)
        # sha256 of a token -> (a node's?, until); and when the API last said yes to it
        self._tokens: dict[bytes, tuple[bool, float]] = {}
        self._known_good: dict[bytes, float] = {}
        self._asking: dict[bytes, asyncio.Future[bool | str | None]] = {}
        self._server: asyncio.Server | None = None
        self.connections: set[_Inbound] = set()
        self.opening: set[_Inbound] = set()  # of `connections`, those not relaying yet
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0: a free port); the address bound, "host:port"."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self, loop), host, port, backlog=1024)
        bound = self._server.sockets[0].getsockname()
        return f"{_bracketed(host)}:{bound[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._auth.aclose()

    async def node_token(self, token: str) -> bool | None:
        """Whether `token` is a node's, as the API says (`GET /v1/whoami`), remembered a moment;
        None when the API cannot say and the token was never seen good. One question at a time per
        token, however many connections wait on it (a gateway opens many at once under load)."""
        if not token.startswith(TOKEN_PREFIX):
            return False
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._tokens.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        asking = self._asking.get(digest)
        if asking is None:
            asking = self._asking[digest] = asyncio.ensure_future(self._ask(token))
            asking.add_done_callback(lambda _: self._asking.pop(digest, None))
        said = await asyncio.shield(asking)
        now = time.monotonic()
        if not isinstance(said, bool):
            # The API cannot say (unreachable, 5xx): a token it said yes to a while ago stays good
            # meanwhile, so the nodes keep reaching each other through an API outage.
            known = self._known_good.get(digest)
            window = STALE_OK_S if said is None else THROTTLED_OK_S
            return True if known is not None and now - known < window else None
        self._tokens[digest] = (said, now + TOKEN_TTL_S)
        if said:
            self._known_good[digest] = now
        else:
            self._known_good.pop(digest, None)
        for remembered in (self._tokens, self._known_good):
            while len(remembered) > TOKEN_CACHE_SIZE:  # made-up tokens cannot grow them
                remembered.pop(next(iter(remembered)))
        return said

    async def _ask(self, token: str) -> bool | str | None:
        try:
            resp = await self._auth.get("/v1/whoami", headers={"authorization": f"Bearer {token}"})
            who = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as e:
            log.warning("the relay could not ask the API about a token: %s", type(e).__name__)
            return None
        if resp.status_code in (401, 403):
            return False
        if resp.status_code == 429:
            return THROTTLED
        if not isinstance(who, dict):
            log.warning("the relay could not ask the API about a token: HTTP %d", resp.status_code)
            return None
        return who.get("role") == "gateway"  # what a node gives its gateway processes

    def _background(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def open(self, conn: _Inbound, line: bytes) -> None:
        """Check the preamble, connect to the instance, answer; then the bytes flow."""
        try:
            asked = relaywire.parse(line)
        except ValueError as e:
            conn.refuse("bad_request", str(e))
            return
        verdict = await self.node_token(asked.token)
        if verdict is None:
            conn.refuse("unavailable", "the API cannot say whether the token is a node's; try again")
            return
        if not verdict:
            conn.refuse("unauthorized", "the relay takes a gateway token (what a node gives its gateways)")
            return
        found = self.lookup(asked.instance)
        if found is None:
            conn.refuse(
                "not_found", f"instance {asked.instance} is not running and ready on node {self.node}"
            )
            return
        path = found.web if asked.kind == "web" else found.control
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Outbound(conn), path), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as e:
            conn.refuse("unreachable", f"instance {asked.instance} refused the connection: {e}")
            return
        try:
            check_peer(transport, found.peer, path)
        except PeerMismatch as e:
            transport.abort()
            log.warning("relay: %s", e)
            conn.refuse("unreachable", f"instance {asked.instance} is not the one listening on its socket")
            return
        conn.connected(transport)


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it reads is written to the other end; when the other
    end's buffer fills up, this one stops reading (backpressure)."""

    transport: asyncio.Transport | None = None
    other: _Side | None = None
    eof = False
    gone = False

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.write(data)

    def eof_received(self) -> bool:
        # Half-close: the other end hears the EOF, and may still answer.
        self.eof = True
        other = self.other
        if other is None or other.transport is None or other.eof:
            self.close()
            if other is not None:
                other.close()
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.reading(False)

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.reading(True)

    def reading(self, on: bool) -> None:
        t = self.transport
        if t is not None and not self.gone and not t.is_closing():
            if on:
                t.resume_reading()
            else:
                t.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.other is not None:
            self.other.close()  # both ends go together (what was written still goes out)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Inbound(_Side):
    """The peer's connection: its preamble first (bounded, and within a few seconds), then a side."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop
        self.buffer = b""  # the preamble so far; then what came after it, until the instance is there
        self.opening = True
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        relay = self.relay
        if len(relay.opening) >= MAX_OPENING or len(relay.connections) >= MAX_CONNECTIONS:
            self.refuse("busy", f"the relay of node {relay.node} has too many connections; try again")
            return
        relay.connections.add(self)
        relay.opening.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timer = self.loop.call_later(PREAMBLE_TIMEOUT_S, self._slow)

    def _slow(self) -> None:
        if self.opening:
            self.refuse("timeout", f"no preamble within {PREAMBLE_TIMEOUT_S:.0f}s")

    def data_received(self, data: bytes) -> None:
        if not self.opening:
            super().data_received(data)
            return
        self.buffer += data
        if self.timer is None:  # the preamble is in: this is what follows it (the instance is coming)
            return
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > relaywire.MAX_PREAMBLE:
                self.refuse("too_large", f"the preamble is over {relaywire.MAX_PREAMBLE} bytes")
            return
        if end + 1 > relaywire.MAX_PREAMBLE:
            self.refuse("too_large", f"the preamble is over {relaywire.MAX_PREAMBLE} bytes")
            return
        line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
        self.timer.cancel()
        self.timer = None
        self.reading(False)  # nothing more until the instance is there
        self.relay._background(asyncio.ensure_future(self._open(line)))

    async def _open(self, line: bytes) -> None:
        try:
            await self.relay.open(self, line)
        except Exception:
            log.exception("relay: opening a connection failed")
            self.refuse("internal", "the relay failed; see the node's log")

    def refuse(self, code: str, message: str) -> None:
        self.opening = False
        self.relay.opening.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(relaywire.error_line(code, message))
            self.transport.close()

    def connected(self, transport: asyncio.Transport) -> None:
        """The instance is there: OK, what the peer sent past its preamble, and the bytes flow."""
        out = self.other
        assert isinstance(out, _Outbound)
        if self.gone or self.transport is None or self.transport.is_closing():
            transport.abort()  # the peer left while the relay was checking
            return
        self.opening = False
        self.relay.opening.discard(self)
        self.transport.write(relaywire.OK)
        if self.buffer:
            transport.write(self.buffer)
            self.buffer = b""
        if self.eof and transport.can_write_eof():
            transport.write_eof()
        self.reading(True)
        out.reading(True)

    def eof_received(self) -> bool:
        if self.opening:
            self.eof = True
            return True  # passed on once the instance is there
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.relay.connections.discard(self)
        self.relay.opening.discard(self)
        super().connection_lost(exc)


class _Outbound(_Side):
    """The connection to the instance's unix socket."""

    def __init__(self, inbound: _Inbound) -> None:
        self.other = inbound
        inbound.other = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reading(False)  # until the peer has its OK: nothing may overtake it


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
