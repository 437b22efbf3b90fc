"""The egress forwarder: inside the sandbox, relay TCP on 127.0.0.1:3128 to the node's egress socket.

An instance's network namespace has only loopback, so `HTTP_PROXY`/`HTTPS_PROXY` point at this
forwarder, which carries each TCP connection over a new connection to the unix socket that the
node's egress proxy (`osless.node.egress`) bind-mounts into the sandbox for this app.
Stdlib only, and single-threaded on purpose: it is forked from a zygote, and fork() copies only the
calling thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BUFFER_LIMIT", "reaped", "retry", "retry_in", "run_forwarder", "start", "start_forwarder_process"]

# Bytes held per direction before we stop reading from the sender: memory stays bounded.
BUFFER_LIMIT = 64 * 1024
_PR_SET_PDEATHSIG = 1


class _Pair:
    """One TCP connection and its unix-socket twin; side 0 is TCP, side 1 is unix."""

    def __init__(self, selector: selectors.BaseSelector, tcp: socket.socket, unix: socket.socket) -> None:
        self.selector = selector
        self.socks = (tcp, unix)
        self.bufs = (bytearray(), bytearray())  # bufs[i]: read from socks[i], to be written to the other
        self.eof = [False, False]  # socks[i] said it will send no more
        self.shut = [False, False]  # we shut down the write side of socks[i]
        self.registered = [False, False]
        self.closed = False

    def on_event(self, side: int, mask: int) -> None:
        if self.closed:  # the other side's event in the same batch already ended the pair
            return
        try:
            if mask & selectors.EVENT_READ:
                self._read(side)
            if mask & selectors.EVENT_WRITE:
                self._write(side)
            self._update()
        except OSError:  # reset, broken pipe...: the end of this pair, never of the forwarder
            self.close()

    def _read(self, side: int) -> None:
        room = BUFFER_LIMIT - len(self.bufs[side])
        if room <= 0 or self.eof[side]:
            return
        try:
            data = self.socks[side].recv(room)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self.bufs[side].extend(data)
            # Try at once: most of the time the other side can take it without a trip through select.
            self._write(1 - side)
        else:
            self.eof[side] = True

    def _write(self, side: int) -> None:
        buf = self.bufs[1 - side]
        if not buf:
            return
        try:
            sent = self.socks[side].send(buf)
        except (BlockingIOError, InterruptedError):
            return
        del buf[:sent]

    def _update(self) -> None:
        if self.closed:
            return
        for side in (0, 1):
            other = 1 - side
            # Half-close: once `side` ended and everything it sent is delivered, end the other's stream.
            if self.eof[side] and not self.bufs[side] and not self.shut[other]:
                self.shut[other] = True
                try:
                    self.socks[other].shutdown(socket.SHUT_WR)
                except OSError:
                    self.close()
                    return
        if all(self.eof) and all(self.shut):
            self.close()
            return
        for side in (0, 1):
            events = 0
            if not self.eof[side] and len(self.bufs[side]) < BUFFER_LIMIT:
                events |= selectors.EVENT_READ
            if self.bufs[1 - side]:
                events |= selectors.EVENT_WRITE
            sock = self.socks[side]
            if events and self.registered[side]:
                self.selector.modify(sock, events, (self, side))
            elif events:
                self.selector.register(sock, events, (self, side))
                self.registered[side] = True
            elif self.registered[side]:
                self.selector.unregister(sock)
                self.registered[side] = False

    def start(self) -> None:
        self._update()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (0, 1):
            if self.registered[side]:
                self.selector.unregister(self.socks[side])
                self.registered[side] = False
            self.socks[side].close()


def _accept(selector: selectors.BaseSelector, listener: socket.socket, unix_path: str) -> None:
    try:
        tcp, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    except OSError as e:
        # EMFILE and friends: drop this one, keep serving; the client retries or fails on its own.
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            print(f"osless forwarder: accept failed: {e}", file=sys.stderr, flush=True)
            return
        raise
    tcp.setblocking(False)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.setblocking(False)
    # A unix stream connect either completes at once or fails (EAGAIN when the backlog is full):
    # it never leaves the loop waiting.
    code = unix.connect_ex(unix_path)
    if code != 0:
        print(
            f"osless forwarder: cannot reach the egress proxy at {unix_path}: {os.strerror(code)}",
            file=sys.stderr,
            flush=True,
        )
        unix.close()
        tcp.close()
        return
    _Pair(selector, tcp, unix).start()


def run_forwarder(
    listen_host: str, listen_port: int, unix_path: str, ready: Callable[[], None] | None = None
) -> None:
    """Listen on listen_host:listen_port and relay each TCP connection to a new connection to
    `unix_path`, bytes both ways, until the process is killed. `ready` is called once listening."""
    listener = socket.create_server((listen_host, listen_port), backlog=128)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    if ready is not None:
        ready()
    while True:
        for key, mask in selector.select():
            if key.data is None:
                _accept(selector, listener, unix_path)
            else:
                pair, side = key.data
                try:
                    pair.on_event(side, mask)
                except Exception:
                    # A bug must cost one connection, not every connection of the instance.
                    traceback.print_exc()
                    pair.close()


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")


def start_forwarder_process(listen_port: int, unix_path: str) -> int:
    """Fork a child that runs the forwarder on 127.0.0.1:listen_port; return its pid once it listens.

    The child dies with the calling *thread* (PR_SET_PDEATHSIG): call this from a thread that lives
    as long as the forwarder should. Raises OSError if the child could not start listening."""
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        told = False
        try:
            os.close(r)
            _set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

            def ready() -> None:
                nonlocal told
                told = True
                os.write(w, b"ok")
                os.close(w)

            run_forwarder("127.0.0.1", listen_port, unix_path, ready)
        except BaseException as e:
            text = f"{type(e).__name__}: {e}"
            if told:
                print(f"osless forwarder: {text}", file=sys.stderr, flush=True)
            else:
                # One write under PIPE_BUF: the parent gets it whole in one read.
                os.write(w, text.encode(errors="replace")[:4000])
        finally:
            os._exit(1)
    os.close(w)
    try:
        # One read: other processes forked meanwhile may hold copies of `w`, so EOF may come late.
        message = os.read(r, 4096)
    finally:
        os.close(r)
    if message != b"ok":
        os.waitpid(pid, 0)
        detail = message.decode(errors="replace") or "it exited before listening"
        raise OSError(f"egress forwarder on 127.0.0.1:{listen_port} failed to start: {detail}")
    return pid


# The sandbox's forwarder, supervised by its pid 1 (the release zygote): the app runs as the same
# user and can kill it, and without it the app has no egress at all.
RETRY_S = (0.05, 0.5, 2.0, 5.0)


@dataclass
class _Supervised:
    port: int
    path: str
    pid: int | None = None  # None while down
    failures: int = 0
    retry_at: float | None = None


_current: _Supervised | None = None


def start(listen_port: int, unix_path: str) -> int:
    """`start_forwarder_process`, remembered so that `reaped` can start it again."""
    global _current
    pid = start_forwarder_process(listen_port, unix_path)
    _current = _Supervised(listen_port, unix_path, pid)
    return pid


def reaped(pid: int) -> bool:
    """Whether `pid` (just reaped by pid 1) was the forwarder; if so it is started again."""
    if _current is None or _current.pid != pid:
        return False
    _current.pid = None
    print("osless: the egress forwarder exited; starting it again", file=sys.stderr, flush=True)
    retry()
    return True


def retry_in() -> float | None:
    """Seconds until the forwarder should be tried again; None when nothing waits."""
    if _current is None or _current.retry_at is None:
        return None
    return max(0.0, _current.retry_at - time.monotonic())


def retry() -> None:
    """Start the forwarder again if it is down and due; on failure, try later (with backoff)."""
    f = _current
    if f is None or f.pid is not None or (f.retry_at is not None and time.monotonic() < f.retry_at):
        return
    try:
        f.pid = start_forwarder_process(f.port, f.path)
        f.failures, f.retry_at = 0, None
    except OSError as e:
        f.retry_at = time.monotonic() + RETRY_S[min(f.failures, len(RETRY_S) - 1)]
        f.failures += 1
        print(f"osless: {e}", file=sys.stderr, flush=True)
