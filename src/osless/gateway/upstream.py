"""HTTP/1.1 to an instance over its unix socket: kept-alive connections whose answers are relayed
to the client byte for byte as they arrive.

The gateway's hot path. An instance's answer is already HTTP/1.1 for the client, so it is written
on unchanged; httptools (the C parser uvicorn uses) only finds where it ends, so that the
connection can take the next request. A `101 Switching Protocols` turns the connection into a
tunnel both ways (websockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import NamedTuple, Protocol

import httptools

from osless import relaywire
from osless.gateway.cookies import SESSION_COOKIE, HeadTooLarge, SessionFilter
from osless.gateway.outliers import Outliers
from osless.peercred import PeerMismatch, check_peer

__all__ = [
    "BadAnswer",
    "OnDone",
    "Peer",
    "RelayDown",
    "Relayed",
    "Unreachable",
    "Upstream",
    "UpstreamConn",
    "UpstreamError",
]

CONNECT_TIMEOUT_S = 5.0  # to an instance's unix socket here: it answers at once, or refuses
# Through another node's relay: a dead machine on a real network answers nothing (no RST), so
# the handshake is given a round trip's worth and more, not seconds; then the relay's answer,
# which may wait on one question to the API about the token (cached by the relay, and bounded
# there at 1.5 s: node.relay.ASK_TIMEOUT_S).
RELAY_CONNECT_TIMEOUT_S = 1.0
RELAY_ANSWER_TIMEOUT_S = 2.0
# The relay's refusals that are about the one instance (it is gone, or refused the relay): its
# node is up, and its other instances may be reached. Any other failure is the node's.
INSTANCE_REFUSALS = (b"ERR not_found ", b"ERR unreachable ")
# Instances close a kept-alive connection after 5 s idle (uvicorn's default); one idle for less
# than this is reused, older ones are closed rather than risk a request racing that close.
REUSE_IDLE_S = 2.0
MAX_IDLE = 1024  # per instance; kept-alive ones close after 5 s idle anyway


class UpstreamError(Exception):
    """The instance broke the exchange (closed early, or sent something that is not HTTP)."""


class BadAnswer(UpstreamError):
    """The instance answered what cannot be relayed (not HTTP, or more than one answer): not tried
    again elsewhere, as the same code answers the same there."""


class Unreachable(UpstreamError):
    """The connection was refused: nothing was sent, so another instance may take the request."""


class RelayDown(Unreachable):
    """The relay itself failed (refused, reset, silent, or refused for a reason that is not the
    instance's): nothing was sent, and the node's other instances are no better just now."""


class Peer(Protocol):
    """The client side an exchange relays to: its transport, and flow control back to it."""

    transport: asyncio.Transport
    responded: bool  # set once a byte of the instance's answer went out: the gateway's own cannot
    # While the peer parses what it read: the connections whose writes wait for the end of it, to
    # go out in one write each (a request's head and the body that came with it: one system call).
    corked: list[UpstreamConn] | None

    def upstream_paused(self, paused: bool) -> None:
        """The instance's socket is full (or has room again): stop (resume) reading the client."""


# Told how an exchange ended: None for a whole answer, else what broke it.
OnDone = Callable[[BaseException | None], None]


class UpstreamConn(asyncio.Protocol):
    """One connection to an instance; between `begin` and `Upstream.release`, one exchange."""

    def __init__(self, pool: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop  # kept: asyncio.get_running_loop() costs a getpid() each call on 3.11
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.peer: Peer | None = None
        self.started = False  # a byte of the answer has reached the client
        self.complete = False
        self.keep_alive = False
        self.upgraded = False
        self.last_data = 0.0
        self.on_done: OnDone | None = None
        self.ended = False  # the exchange has its outcome: `error`, None for a whole answer
        self.error: BaseException | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._interim = False
        self._upgrading = False
        self._overrun = False  # the instance sent more after its answer's end
        self.reading_paused = False  # by the client's flow control
        self._held: list[bytes] | None = None  # written while the peer was corked (`uncork`)
        # An answer's head may not set the dashboard's cookie (`gateway.cookies`): passed, once its
        # final head went to the client; whole, once the parser read that head.
        self._head_passed = self._head_whole = False
        self._heads: SessionFilter | None = None  # a head held or rewritten: the slow way

    def begin(self, peer: Peer, head_only: bool, on_done: OnDone) -> None:
        """Start an exchange; `on_done` hears once how it ended (an `UpstreamError` if it broke),
        never from within a caller's own call."""
        self.peer = peer
        self.on_done = on_done
        self.started = self.complete = self.keep_alive = self.upgraded = self.ended = False
        self.error = None
        self._interim = self._upgrading = self._overrun = False
        self._head_passed = self._head_whole = False
        self._heads = None
        # One parser for the connection's answers, one after another; a fresh one only after an
        # answer whose end the parser could not see (HEAD, 204, 304: a body announced, none sent).
        # A HEAD's answer has a parser that also hears the body it must not have (it costs a copy
        # of each body chunk, which the others never have).
        if head_only:
            self._parser = httptools.HttpResponseParser(_HeadOnly(self))
        elif self._parser is None or self._head_only:
            self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self.last_data = self.loop.time()

    def write(self, data: bytes) -> None:
        # Once lost, the exchange hears of it; a write then (uvloop raises) is dropped.
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            corked = self.peer.corked if self.peer is not None else None
            if corked is None:
                self.transport.write(data)
            elif self._held is None:
                self._held = [data]
                corked.append(self)
            else:
                self._held.append(data)

    def uncork(self) -> None:
        """Write what waited while the peer parsed its read, in one write."""
        held, self._held = self._held, None
        if held and self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused and not self.lost:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()

    def fail(self, error: BaseException) -> None:
        """End the exchange with `error` (if it has not ended); heard in a later turn of the loop."""
        if self.on_done is not None and not self.ended:
            self.ended = True
            self.error = error
            self.loop.call_soon(self._tell, self.on_done)

    def _tell(self, on_done: OnDone) -> None:
        if on_done is self.on_done:  # still the same exchange
            on_done(self.error)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or (self.complete and not self.upgraded):
            self.abort()  # an instance talking out of turn is not reused
            return
        self.last_data = self.loop.time()
        tunnel = self.upgraded  # already a tunnel: bytes both ways, nothing to parse
        if not tunnel:
            assert self._parser is not None
            try:
                self._parser.feed_data(data)  # before the bytes are relayed: they must be one answer's
            except httptools.HttpParserUpgrade:
                self.upgraded = True  # the bytes after the 101's head are the tunnel's: relayed below
                self._finish()
            except httptools.HttpParserError as e:
                # Not HTTP (or more after a `connection: close` answer): none of it goes to the client.
                self._refuse(f"bad response from the instance: {e}")
                return
            if self._overrun:
                # Another answer behind this one, in the same read: relayed, the client would take it
                # for the answer to its next request, which may be for another app.
                self._refuse("the instance sent bytes past the end of its answer")
                return
            if not self._head_passed:
                if self._head_whole and self._heads is None and SESSION_COOKIE not in data:
                    self._head_passed = True  # the common answer: its head whole in one read, clean
                else:
                    heads = self._heads = self._heads or SessionFilter()
                    try:
                        data = heads.feed(data)
                    except HeadTooLarge as e:
                        self._refuse(str(e))
                        return
                    self._head_passed = heads.done
                    if not data:
                        return  # a head not whole yet: held, as it might set the dashboard's cookie
        self.started = peer.responded = True
        if not peer.transport.is_closing():
            peer.transport.write(data)
        if tunnel:
            return
        if self.complete and self.on_done is not None and not self.ended:
            # Told here, once the parser is done with the data, rather than a turn later: the
            # hot path's answer costs no scheduled callback.
            self.ended = True
            self.on_done(None)

    def _refuse(self, why: str) -> None:
        """End the exchange on an answer that cannot be relayed, and never reuse the connection."""
        self.keep_alive = False
        self.fail(BadAnswer(why))
        self.abort()

    def eof_received(self) -> bool | None:
        return None  # close: half-open connections are not kept

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.on_done is not None and not self.ended:
            when = "mid-response" if self.started else "before answering"
            self.fail(UpstreamError(f"the instance closed the connection {when}"))
        elif self.upgraded and self.peer is not None:
            self.peer.transport.close()  # the tunnel's far end closed

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.upstream_paused(False)

    # -- httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self._overrun = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        code = self._parser.get_status_code()
        if code == 101:
            self._upgrading = self._head_whole = True
            return
        if code < 200:
            self._interim = True  # 1xx before the answer: relayed, and the answer follows
            return
        self._head_whole = True
        self.keep_alive = self._parser.should_keep_alive()  # only meaningful here
        if self._head_only or code in (204, 304):
            self._head_only = True  # the next exchange needs a fresh parser
            self._finish()  # no body follows, whatever its headers say

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._upgrading:
            self._finish()

    def _finish(self) -> None:
        self.complete = True  # `data_received` tells the exchange, once the parser returns


class _HeadOnly:
    """The parser's callbacks for the answer to a HEAD: a byte of body after its head is one too many."""

    __slots__ = ("conn",)

    def __init__(self, conn: UpstreamConn) -> None:
        self.conn = conn

    def on_message_begin(self) -> None:
        self.conn.on_message_begin()

    def on_headers_complete(self) -> None:
        self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.conn.complete:
            self.conn._overrun = True

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class Relayed(NamedTuple):
    """An instance on another node: reached over TCP through that node's relay (`node.relay`)."""

    host: str
    port: int
    token: str  # this node's token, which the relay asks the API about
    instance: str
    kind: str  # "web" or "control"

    def __repr__(self) -> str:  # never the token, wherever this is printed
        return f"Relayed({self.host}:{self.port}, {self.instance}, {self.kind})"


class _RelayedConn(UpstreamConn):
    """A connection through a relay: its first line in is the relay's answer to the preamble; then
    it is a connection to the instance like any."""

    def __init__(self, pool: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(pool, loop)
        self.answer: asyncio.Future[None] | None = loop.create_future()
        self._line = b""

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:
            super().data_received(data)
            return
        self._line += data
        end = self._line.find(b"\n")
        if end < 0:
            if len(self._line) > relaywire.MAX_ANSWER:
                self._refused("an answer too long")
            return
        line, rest = self._line[: end + 1], self._line[end + 1 :]
        self.answer = None
        if line != relaywire.OK:
            self.abort()
            said = f"the relay refused: {line.decode('ascii', 'replace').strip()}"
            answer.set_exception(Unreachable(said) if line.startswith(INSTANCE_REFUSALS) else RelayDown(said))
        elif rest:  # the instance does not speak first
            self.abort()
            answer.set_exception(RelayDown("the relay sent bytes before any request"))
        else:
            answer.set_result(None)

    def _refused(self, what: str) -> None:
        self.abort()
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(RelayDown(f"the relay sent {what}"))
        self.answer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(RelayDown("the relay closed the connection before answering"))
        self.answer = None
        super().connection_lost(exc)


class Upstream:
    """One instance's socket and its idle connections.

    `peer` is the (pid, uid) the node agent reported for the instance: a new connection whose
    listening process is anything else (SO_PEERCRED) is refused before a byte is sent to it.
    `relay`: the instance is on another node, reached through its relay (which checks the peer);
    `path` then only names it. `outliers` hears whether the relay took each new connection.
    """

    def __init__(
        self,
        path: str,
        peer: tuple[int, int] | None = None,
        relay: Relayed | None = None,
        outliers: Outliers | None = None,
    ) -> None:
        self.path = path
        self.peer = peer
        self.relay = relay
        self.outliers = outliers
        self.idle: list[UpstreamConn] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False  # retired: connections coming back are closed, not kept

    def take_idle(self) -> UpstreamConn | None:
        """An idle connection fit to reuse, if there is one."""
        while self.idle:
            conn = self.idle.pop()
            fresh_enough = conn.loop.time() - conn.idle_since < REUSE_IDLE_S
            if (
                fresh_enough
                and not conn.lost
                and conn.transport is not None
                and not conn.transport.is_closing()
            ):
                return conn
            conn.abort()
        return None

    async def acquire(self, fresh: bool = False) -> UpstreamConn:
        """An idle connection, else a new one; `Unreachable` if the instance refuses."""
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        found = None if fresh else self.take_idle()
        if found is not None:
            return found
        if self.relay is not None:
            return await self._through_relay(loop, self.relay)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(lambda: UpstreamConn(self, loop), self.path), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as e:
            raise Unreachable(str(e) or type(e).__name__) from e
        if self.peer is not None:
            try:
                check_peer(conn.transport, self.peer, self.path)  # type: ignore[arg-type]
            except PeerMismatch as e:
                conn.abort()
                raise Unreachable(str(e)) from e
        return conn

    async def _through_relay(self, loop: asyncio.AbstractEventLoop, relay: Relayed) -> UpstreamConn:
        address = (relay.host, relay.port)
        try:
            conn = await self._relay_connection(loop, relay)
        except RelayDown as e:
            if self.outliers is not None:
                self.outliers.failed(address, str(e))
            raise
        if self.outliers is not None:
            self.outliers.ok(address)
        return conn

    async def _relay_connection(self, loop: asyncio.AbstractEventLoop, relay: Relayed) -> _RelayedConn:
        where = f"relay {relay.host}:{relay.port}"
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _RelayedConn(self, loop), relay.host, relay.port),
                RELAY_CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            raise RelayDown(f"{where}: no handshake within {RELAY_CONNECT_TIMEOUT_S:g}s") from None
        except OSError as e:
            raise RelayDown(f"{where}: {e or type(e).__name__}") from e
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # small requests go at once, not after the last one's ACK
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.is_closing():
                # Its node died as the connection was made: gone before a byte (uvloop would raise
                # on the write), so another instance may take the request.
                raise RelayDown(f"{where}: the relay closed the connection at once")
            transport.write(relaywire.preamble(relay.token, relay.instance, relay.kind))
            assert conn.answer is not None
            try:
                await asyncio.wait_for(conn.answer, RELAY_ANSWER_TIMEOUT_S)
            except TimeoutError:
                raise RelayDown(f"{where}: no answer within {RELAY_ANSWER_TIMEOUT_S:g}s") from None
            except Unreachable as e:
                raise type(e)(f"{where}: {e}") from None
        except BaseException:
            conn.abort()
            raise
        return conn

    def release(self, conn: UpstreamConn) -> None:
        """Back to the pool if its exchange ended cleanly and may continue, else closed."""
        conn.peer = None
        conn.on_done = None
        reusable = conn.complete and conn.keep_alive and not conn.lost and not conn.upgraded
        # Not with part of a request still unsent (an answer that came before the whole body).
        unsent = conn.transport is not None and conn.transport.get_write_buffer_size() > 0
        if reusable and not unsent and not self.closed and len(self.idle) < MAX_IDLE:
            if conn.reading_paused:  # a slow client paused it
                conn.resume_reading()
            conn.idle_since = conn.loop.time()
            self.idle.append(conn)
            return
        if conn.upgraded and conn.transport is not None:
            conn.transport.close()
        else:
            conn.abort()

    def forget(self, conn: UpstreamConn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    async def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
