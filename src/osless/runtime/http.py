"""The instance's HTTP/1.1 protocol: uvicorn's httptools one, made cheaper per request.

Two costs of uvicorn's own are taken out of each request, for the gateway's hot path:
- it writes an answer's head and its body in two system calls, so the gateway on the other end of
  the unix socket is woken twice for one answer. Here the small writes an ASGI task makes in one turn
  of the loop go out in one call: a whole answer as soon as it is complete, the parts of a stream at
  the end of the turn that wrote them. Past `CORK_BYTES` held, writes go straight on, so that
  uvicorn's flow control (which watches the real transport's buffer) still holds a fast producer back;
- it cancels a keep-alive timer when a request arrives and starts a new one when it is answered.
  Here one timer per connection looks at the connection when it fires, and closes it only if it
  has been idle for the whole keep-alive time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CORK_BYTES", "CorkedTransport", "InstanceHttpProtocol"]

CORK_BYTES = 64 * 1024  # uvicorn's high-water mark: more than this is never held back


class CorkedTransport:
    """A transport whose writes within one turn of the loop are joined into one."""

    __slots__ = ("_held", "_held_bytes", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= CORK_BYTES:  # big enough to go alone, after what was held
            self.flush()
            self.transport.write(data)
            return
        if self._held is None:
            self._held = [bytes(data)]
            self._held_bytes = len(data)
            self._loop.call_soon(self.flush)
            return
        self._held.append(bytes(data))
        self._held_bytes += len(data)
        if self._held_bytes >= CORK_BYTES:
            self.flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return (self._held_bytes if self._held else 0) + self.transport.get_write_buffer_size()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()  # what was written before a close still goes out
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self.transport.abort()

    # Called on every request: spelled out rather than found through __getattr__.
    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, set_protocol, ...
        return getattr(self.transport, name)


class InstanceHttpProtocol(HttpToolsProtocol):
    transport: CorkedTransport  # type: ignore[assignment]
    _idle_since: float | None = None  # None while a request is under way

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # data came: busy (the timer, if any, sees it when it fires)

    def on_response_complete(self) -> None:
        # uvicorn's own, but for the flush and the keep-alive timer.
        self.transport.flush()  # a whole answer waits for nothing: out now, not at the turn's end
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive)

    def _keep_alive(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return  # busy: its answer arms the timer again
        idle_until = self._idle_since + self.timeout_keep_alive
        if self.loop.time() >= idle_until:
            self.timeout_keep_alive_handler()
        else:
            self.timeout_keep_alive_task = self.loop.call_at(idle_until, self._keep_alive)
