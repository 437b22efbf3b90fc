"""The gateway's client side: HTTP/1.1 connections parsed with httptools, one request at a time.

Each request's head is handed to a handler coroutine (`Gateway.handle`) that routes it; its body
follows as it arrives, straight into the instance's connection once one is attached (buffered
until then). Answers come back through `upstream.UpstreamConn`, byte for byte. Pipelined requests
wait their turn; a `101` turns the connection into a tunnel.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

import httptools

from osless.gateway.upstream import UpstreamConn

__all__ = ["ClientConnection", "ClientGone", "Request", "TooLarge", "error_response"]

log = logging.getLogger("osless.gateway")

KEEP_ALIVE_S = 15.0  # an idle client connection is closed after this
MAX_HEAD_BYTES = 64 * 1024
BUFFER_BYTES = 1024 * 1024  # of body read ahead of an instance to send it to
LINGER_S = 2.0


class TooLarge(Exception):
    """The request body went past the app's limit."""


class Request:
    """One request: its head as parsed, and its body as it comes."""

    # Defaults on the class, so that a request sets only what it changes (no __slots__: a class
    # default cannot share a name with a slot). Each request is a new object: half of what it
    # costs was setting these one by one.
    url = b""
    method = b""
    version = "1.1"
    # Noted as they are parsed (the first of each), for the routing that follows.
    host = b""
    expect = b""
    content_length = b""
    head_bytes = 0
    keep_alive = True
    upgrade = False
    chunked = False
    coded = False  # it had a Transfer-Encoding
    buffered = 0
    body_bytes = 0
    complete = False
    discard = False  # answered already: the rest of the body is dropped as it comes
    limit: int | None = None
    sink: UpstreamConn | None = None
    too_large = False
    tunnel_data = b""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased
        self.body: list[bytes] = []

    def header(self, name: bytes) -> bytes:
        for k, v in self.headers:
            if k == name:
                return v
        return b""

    def attach(self, sink: UpstreamConn) -> None:
        """From now on the body goes to `sink` (what was buffered first, framed as the head says)."""
        self.sink = sink
        if self.too_large:  # went past the limit while it waited for an instance
            sink.fail(TooLarge())
            return
        if self.body:
            for chunk in self.body:
                sink.write(self._frame(chunk))
            self.body.clear()
            self.buffered = 0
            self.conn.pause("buffer", False)
        if self.complete and self.chunked:
            sink.write(b"0\r\n\r\n")

    def detach(self) -> None:
        self.sink = None

    def feed(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.limit is not None and self.body_bytes > self.limit:
            self.body.clear()
            self.too_large = True
            if self.discard:
                self.conn.linger()
                return
            if self.sink is not None:
                self.sink.fail(TooLarge())
            self.conn.pause("buffer", True)  # read no more of it: the connection ends after the 413
            return
        if self.discard:
            return
        if self.sink is not None:
            self.sink.write(self._frame(data))
            self.sink.last_data = self.conn.loop.time()  # an upload under way is not a silent instance
            return
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > BUFFER_BYTES:
            self.conn.pause("buffer", True)

    def finish(self) -> None:
        self.complete = True
        if self.sink is not None:
            if self.chunked:
                self.sink.write(b"0\r\n\r\n")
            self.sink.last_data = self.conn.loop.time()  # the instance's time to answer starts now

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data


Handler = Callable[["ClientConnection", Request], Coroutine[Any, Any, None]]
# Takes the request on without a coroutine if it can (then calls `finished` itself): True if so.
FastHandler = Callable[["ClientConnection", Request], bool]
# The current request's own clock, read by the connection's watchdog: given the time now, act on
# whatever is overdue and say when to look again (None: no need).
Deadline = Callable[[float], float | None]


class ClientConnection(asyncio.Protocol):
    """One client's connection to the gateway port."""

    def __init__(
        self, handler: Handler, loop: asyncio.AbstractEventLoop, fast: FastHandler | None = None
    ) -> None:
        self.handler = handler
        self.fast = fast
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time on 3.11.
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.client_ip = b""  # as the x-forwarded-for the instance gets
        # (Host, prefix, the x-forwarded-* lines) of the last request forwarded: the next is alike.
        self.forwarded: tuple[bytes, bytes, bytes] | None = None
        self.closed = False
        self.must_close = False  # after the current answer
        self.responded = False  # the current request has had (a start of) an answer
        self.tunnel: UpstreamConn | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: Request | None = None
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: deque[Request] = deque()
        self._paused: set[str] = set()
        self.write_paused = False
        self._sink: UpstreamConn | None = None
        self.corked: list[UpstreamConn] | None = None  # while a read is parsed (`UpstreamConn.write`)
        # One timer for the connection's life, re-armed only when it fires or must fire sooner:
        # a request then costs no timer of its own (they cost more than the rest of the hop).
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self._idle_since = 0.0
        self.deadline: Deadline | None = None
        self._upgraded = False
        self._broken: tuple[int, str, str] | None = None  # a bad request behind the current one
        self._draining = False  # closing: what the client still sends is read and dropped
        self.last_data = 0.0  # of the tunnel's client side
        self.lost: asyncio.Future[None] = loop.create_future()
        self.on_close: Callable[[ClientConnection], None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if isinstance(peer, tuple) else b""
        self._idle()
        self.watch_until(self._idle_since + KEEP_ALIVE_S)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        if self.tunnel is not None:
            self.last_data = self.loop.time()
            self.tunnel.write(data)
            return
        if self._upgraded:  # before the tunnel is up: kept for it
            if self._parsing is not None:
                self._parsing.tunnel_data += data
            return
        # What the read's requests write to instances goes out after it, at once: a head and the
        # body that came with it in one system call, not one for each.
        corked: list[UpstreamConn] = []
        self.corked = corked
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded = True
            if self._parsing is not None:
                self._parsing.tunnel_data = data[e.args[0] :]
            self.pause("upgrade", True)
        except httptools.HttpParserError as e:
            # A callback's own exception comes wrapped (HttpParserCallbackError).
            cause = e.__context__
            if isinstance(cause, _HeadTooLarge):
                self._bad(431, "head_too_large", f"request line and headers exceed {MAX_HEAD_BYTES} bytes")
            elif isinstance(cause, _BadFraming):
                self._bad(
                    400,
                    "bad_request",
                    "this is not a valid HTTP/1.1 request: a Transfer-Encoding must end in chunked",
                )
            elif isinstance(e, httptools.HttpParserCallbackError) and cause is not None:
                log.error("the gateway failed on a request", exc_info=cause)
                self._bad(500, "internal", "the gateway failed; see its log")
            else:
                self._bad(400, "bad_request", f"this is not a valid HTTP/1.1 request: {e}")
        finally:
            self.corked = None
            for up in corked:
                up.uncork()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if self.on_close is not None:
            self.on_close(self)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # its cleanup drops the instance's connection
        elif self._current is not None and self._sink is not None:
            self._sink.fail(ClientGone())  # a request on the fast path: it ends, and drops it
        if self.tunnel is not None:
            self.tunnel.abort()

    def pause_writing(self) -> None:
        self.write_paused = True
        sink = self.tunnel or self._sink
        if sink is not None:
            sink.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        sink = self.tunnel or self._sink
        if sink is not None:
            sink.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self)

    def on_url(self, url: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.url += url
        req.head_bytes += len(url)
        if req.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        name = name.lower()
        req.headers.append((name, value))
        if name in _NOTED:
            if name == b"host":
                req.host = req.host or value
            elif name == b"content-length":
                req.content_length = req.content_length or value
            elif name == b"expect":
                req.expect = req.expect or value
            else:  # transfer-encoding: the last coding of the last such header frames the body
                req.coded = True
                req.chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        req.head_bytes += len(name) + len(value)
        if req.head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        if req.coded and not req.chunked:
            # Its body has no length anyone agrees on: refused before the instance sees its head.
            raise _BadFraming()
        p = self._parser
        req.method = p.get_method()
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        req.upgrade = p.should_upgrade()
        if self._current is None:
            self._start(req)
        else:
            self._pending.append(req)
            self.pause("pipeline", True)  # one at a time: read on when it is its turn

    def on_body(self, data: bytes) -> None:
        if self._parsing is not None:
            self._parsing.feed(data)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is None:
            return
        req.finish()
        if req.discard and not self.closed:  # its answer went out before; now its body is done
            if not req.keep_alive or self.must_close:
                self.transport.close()
            else:
                self._next()

    # -- for the handler -----------------------------------------------------------------------------

    def attach(self, sink: UpstreamConn) -> None:
        """`sink` answers the current request: flow control now runs between the two."""
        self._sink = sink
        if self.write_paused:
            sink.pause_reading()
        elif sink.reading_paused:
            sink.resume_reading()

    def detach(self) -> None:
        self._sink = None

    def upstream_paused(self, paused: bool) -> None:
        self.pause("upstream", paused)

    def start_tunnel(self, sink: UpstreamConn) -> None:
        """After a 101: bytes flow both ways unparsed until either side closes."""
        self.tunnel = sink
        self.last_data = self.loop.time()
        if self._current is not None and self._current.tunnel_data:
            sink.write(self._current.tunnel_data)
            self._current.tunnel_data = b""
        self.pause("upgrade", False)

    def respond(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, close: bool = False
    ) -> None:
        """An answer of the gateway's own (errors, health)."""
        if self.closed or self.responded:
            return
        self.responded = True
        if close:
            self.must_close = True
        if self._current is not None and self._current.method == b"HEAD":
            body_length, body = len(body), b""  # the length a GET would get; no body follows a HEAD
        else:
            body_length = len(body)
        phrase = HTTPStatus(status).phrase.encode()
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, phrase), b"content-length: %d\r\n" % body_length]
        lines += [k + b": " + v + b"\r\n" for k, v in headers or []]
        if self.must_close:
            lines.append(b"connection: close\r\n")
        self.transport.write(b"".join(lines) + b"\r\n" + body)

    def pause(self, reason: str, on: bool) -> None:
        """Reading the client stops while any reason holds."""
        if not on and not self._paused:
            return  # the common case, on the hot path
        before = bool(self._paused)
        if on:
            self._paused.add(reason)
        else:
            self._paused.discard(reason)
        if self.closed or before == bool(self._paused):
            return
        if self._paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- one request after another -------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self._current = req
        self.responded = False
        if self.fast is not None and self.fast(self, req):
            return
        self.run(self.handler(self, req))

    def run(self, work: Coroutine[Any, Any, None]) -> None:
        """The current request goes on in `work`, a coroutine; its end is the request's."""
        self._task = self.loop.create_task(work)
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self.finished(None if task.cancelled() else task.exception())

    def finished(self, error: BaseException | None) -> None:
        """The current request is over (answered, or failed with `error`): on to the next."""
        req = self._current
        self._sink = None
        if req is not None:
            req.body.clear()
        if error is not None:
            log.error("the gateway failed on a request", exc_info=error)
            if not self.responded:
                self.respond(500, error_response("internal", "the gateway failed; see its log"), close=True)
            self.must_close = True
        self._current = None
        if self.closed or self.tunnel is not None:  # a tunnel owns the connection now
            return
        if self._paused:  # whatever held reading back was about this request
            self.pause("upstream", False)
            self.pause("buffer", False)
        if self._broken is not None:  # a bad request came in behind it: answered now, in turn
            status, code, message = self._broken
            self.responded = False
            self.respond(
                status, error_response(code, message), [(b"content-type", b"application/json")], True
            )
            self.transport.close()
            return
        if req is None or (self._upgraded and not self._pending):
            # The upgrade was this request's, and it did not become a tunnel: what follows on the
            # connection is not HTTP. (One still pending is started in its turn, below.)
            self.transport.close()
            return
        if not req.complete:
            if self.must_close or req.too_large:
                self.linger()  # the rest of its body is not worth reading
            else:
                # Answered before its body was all in (the app did not read it): the rest is
                # read and dropped, and the connection goes on after it.
                req.discard = True
                self._idle()
            return
        if not req.keep_alive or self.must_close:
            self.transport.close()
            return
        self._next()

    def _next(self) -> None:
        if self._pending:
            self._start(self._pending.popleft())
            if not self._pending:
                self.pause("pipeline", False)
            return
        if self._paused:
            self.pause("pipeline", False)
        self._idle_since = self.loop.time()  # `_idle`, inline: the hot path's end

    def _idle(self) -> None:
        self._idle_since = self.loop.time()  # the watchdog closes it KEEP_ALIVE_S from now

    def watch_until(self, when: float) -> None:
        """Make sure the watchdog looks at this connection by `when`."""
        if self._watch is not None:
            if self._watch_at <= when:
                return
            self._watch.cancel()
        if not self.closed:
            self._watch_at = when
            self._watch = self.loop.call_at(when, self._look)

    def _look(self) -> None:
        self._watch = None
        if self.closed or self._draining:  # lingering: that has a close of its own
            return
        now = self.loop.time()
        if self._current is None:
            due = self._idle_since + KEEP_ALIVE_S
            if now >= due:
                self.transport.close()
                return
        else:
            due = now + KEEP_ALIVE_S  # busy: nothing of its own to expire
            if self.deadline is not None:
                mine = self.deadline(now)
                if mine is not None:
                    due = min(due, mine)
        self.watch_until(due)

    def _bad(self, status: int, code: str, message: str) -> None:
        if self._current is not None:  # an answer is under way: this one follows it
            self._broken = (status, code, message)
            self.pause("broken", True)
            return
        self.respond(
            status, error_response(code, message), [(b"content-type", b"application/json")], close=True
        )
        self.transport.close()

    def linger(self) -> None:
        """Close without a reset: stop writing, read (and drop) what the client still sends for a
        moment, then close. Closing with unread input would reset the connection, and the client
        could lose the answer it was sent."""
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._paused.clear()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


_NOTED = frozenset((b"host", b"content-length", b"expect", b"transfer-encoding"))


class _HeadTooLarge(Exception):
    pass


class _BadFraming(Exception):
    """A Transfer-Encoding whose last coding is not chunked (RFC 9112 6.3: 400, then close)."""


class ClientGone(Exception):
    """The client closed its connection before the answer was whole."""


def error_response(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()
