"""HTTP/1.1 to an instance over its unix socket: kept-alive connections, bytes relayed as they come.

The gateway's hot path. A general client (httpx) spends most of a request here on its pool's
bookkeeping; an instance is one socket that speaks one protocol, so this keeps a stack of idle
connections and parses responses with httptools (the C parser uvicorn uses).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools

__all__ = ["Response", "Unreachable", "Upstream", "UpstreamError"]

READ_CHUNK = 64 * 1024
NO_BODY_STATUS = {204, 304}


class UpstreamError(Exception):
    """The instance broke the exchange (closed early, sent garbage, or was too slow)."""


class Unreachable(UpstreamError):
    """The connection was refused: nothing was sent, so another instance may take the request."""


class _Stale(Exception):
    """The connection closed before any byte of an answer: the request may be sent again."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    _upstream: Upstream
    _conn: _Conn
    _parser: httptools.HttpResponseParser
    _chunks: list[bytes]
    _done: list[bool]
    _read_timeout: float
    _body_expected: bool
    _keep_alive: bool
    _closed: bool = field(default=False)

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked framing already removed by the parser)."""
        if not self._body_expected:
            self._done[0] = True
            return
        while True:
            while self._chunks:
                yield self._chunks.pop(0)
            if self._done[0]:
                return
            try:
                data = await asyncio.wait_for(self._conn.reader.read(READ_CHUNK), self._read_timeout)
            except TimeoutError as e:
                raise UpstreamError(f"no data for {self._read_timeout:.0f}s") from e
            if not data:
                with contextlib.suppress(httptools.HttpParserError):
                    self._parser.feed_data(b"")  # a body delimited by the connection's end
                if not self._done[0] and not self._chunks:
                    raise UpstreamError("the instance closed the connection mid-response")
                self._done[0] = True
                continue
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                raise UpstreamError(f"bad response from the instance: {e}") from e

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly and may continue, else closed."""
        if self._closed:
            return
        self._closed = True
        if (
            self._done[0]
            and not self._chunks
            and self._keep_alive
            and not self._upstream.closed
            and len(self._upstream.idle) < self._upstream.max_idle
        ):
            self._upstream.idle.append(self._conn)
        else:
            self._conn.close()


class Upstream:
    """One instance's socket and its idle connections."""

    def __init__(self, path: str, max_idle: int = 64) -> None:
        self.path = path
        self.max_idle = max_idle
        self.idle: list[_Conn] = []
        self.closed = False  # retired: connections coming back are closed, not kept

    async def _connect(self, reuse: bool = True) -> tuple[_Conn, bool]:
        """A connection, and whether it was reused (a reused one may have just been closed by the
        instance's keep-alive timer: the caller retries such a failure on a fresh connection)."""
        while reuse and self.idle:
            conn = self.idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.close()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.path), 5)
        except (OSError, TimeoutError) as e:
            raise Unreachable(str(e) or type(e).__name__) from e
        return _Conn(reader, writer), False

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        read_timeout: float,
    ) -> Response:
        conn, reused = await self._connect()
        try:
            return await self._exchange(conn, method, target, headers, body, read_timeout)
        except _Stale:
            conn.close()
            if not reused or not isinstance(body, bytes):
                raise UpstreamError("the instance closed the connection before answering") from None
        except BaseException:
            conn.close()
            raise
        conn, _ = await self._connect(reuse=False)  # nothing reached the app: once more, afresh
        try:
            return await self._exchange(conn, method, target, headers, body, read_timeout)
        except _Stale:
            conn.close()
            raise UpstreamError("the instance closed the connection before answering") from None
        except BaseException:
            conn.close()
            raise

    async def _exchange(
        self,
        conn: _Conn,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        read_timeout: float,
    ) -> Response:
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
        head += [
            k + b": " + v + b"\r\n" for k, v in headers if k not in (b"content-length", b"transfer-encoding")
        ]
        if isinstance(body, bytes):
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                head.append(b"content-length: %d\r\n" % len(body))
            conn.writer.write(b"".join(head) + b"\r\n" + body)
        else:
            conn.writer.write(b"".join(head) + b"transfer-encoding: chunked\r\n\r\n")
            async for chunk in body:
                if chunk:
                    conn.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await asyncio.wait_for(conn.writer.drain(), read_timeout)  # an app not reading
            conn.writer.write(b"0\r\n\r\n")
        try:
            await asyncio.wait_for(conn.writer.drain(), read_timeout)
        except ConnectionError as e:
            raise _Stale() from e

        got: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        done = [False]
        headers_done = [False]
        keep_alive = [False]

        class Callbacks:
            def on_header(self, name: bytes, value: bytes) -> None:
                got.append((name, value))

            def on_headers_complete(self) -> None:
                headers_done[0] = True
                keep_alive[0] = parser.should_keep_alive()  # only meaningful here: it resets at the end

            def on_body(self, data: bytes) -> None:
                chunks.append(data)

            def on_message_complete(self) -> None:
                done[0] = True

        parser = httptools.HttpResponseParser(Callbacks())
        while not headers_done[0]:
            try:
                data = await asyncio.wait_for(conn.reader.read(READ_CHUNK), read_timeout)
            except TimeoutError as e:
                raise TimeoutError(f"no answer within {read_timeout:.0f}s") from e
            if not data:
                # After the request went out this may be a crash mid-request: never sent twice.
                raise UpstreamError("the instance closed the connection before answering")
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                break
            except httptools.HttpParserError as e:
                raise UpstreamError(f"bad response from the instance: {e}") from e
        code = parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # The gateway drops Expect, so none should come; one that does must not be taken for
            # the answer (the real one would then reach whoever uses this connection next).
            raise UpstreamError(f"unexpected interim response {code} from the instance")
        expected = method != "HEAD" and code not in NO_BODY_STATUS and code >= 200
        return Response(code, got, self, conn, parser, chunks, done, read_timeout, expected, keep_alive[0])

    async def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        self.idle.clear()
