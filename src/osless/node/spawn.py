"""The single spawn path: the node's root zygote, release zygotes forked from it, and instances.

    agent ──▶ root zygote (started once; the runtime preloaded)
                 └─ spawn ─▶ release zygote, in the app's sandbox (imports the app once)
                                └─ fork ─▶ instance (moves itself into its cgroups, then serves)

Everything that creates a process for app code goes through here and `osless.runtime.zygote`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osless.images.runtime import RuntimeLayer
from osless.logs import LogWriter
from osless.runtime import protocol

__all__ = ["ChildExited", "ExitStatus", "RootZygote", "Zygote", "ZygoteFailed"]

ZYGOTE_START_TIMEOUT = 60.0
MAX_LINE = 16384  # bytes of one line of an instance's output kept in its log; the rest is dropped


class ZygoteFailed(Exception):
    """A zygote could not start (the message ends with the error)."""


@dataclass
class ExitStatus:
    code: int | None
    signal: int | None


class ChildExited(Exception):
    """The instance exited before it was ready."""

    def __init__(self, status: ExitStatus) -> None:
        super().__init__(f"exited before ready: code={status.code} signal={status.signal}")
        self.status = status


@dataclass
class Child:
    """An instance as the agent sees it: its real pid arrives with its `ready` message."""

    ready: asyncio.Future[None]
    exited: asyncio.Future[ExitStatus]
    # Set with the reason when the instance asks to be replaced (a handler ran past its deadline).
    recycle: asyncio.Future[str]
    pid: int = 0
    pid_is_real: bool = False  # False while `pid` is the sandbox's numbering
    # Its output, access lines and spans read to their end (`forward_lines`): what its log waits for.
    read_out: list[asyncio.Future[None]] = field(default_factory=list)


class _Channel:
    """One end of a SEQPACKET control socket, read on the loop; `on_message` gets (msg, sender pid)."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[dict[str, Any], int | None], None],
        on_eof: Callable[[], None],
    ) -> None:
        self.sock: socket.socket | None = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._on_message = on_message
        self._on_eof = on_eof
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                msg, fds, pid = protocol.recv_with_sender(self.sock)
            except BlockingIOError:
                return
            except (OSError, protocol.ProtocolError):
                msg, fds, pid = None, [], None
            for fd in fds:
                os.close(fd)
            if msg is None:
                self.close()
                self._on_eof()
                return
            self._on_message(msg, pid)

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if self.sock is None:
            raise ZygoteFailed("the zygote is not running")
        protocol.send(self.sock, msg, fds or [])

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


class RootZygote:
    """The node's first interpreter: the runtime imported once; it forks release zygotes on request."""

    def __init__(self, log: LogWriter, runtime: RuntimeLayer) -> None:
        self.log = log
        self.runtime = runtime
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: _Channel | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None

    @property
    def running(self) -> bool:
        return self._channel is not None and self._channel.sock is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # sys.path: the stdlib and the runtime layer, nothing of the platform's own environment;
        # what it imports now is what every instance has before its app's layers.
        cmd = self.runtime.command("osless.runtime.zygote", "--root", "--control-fd", str(theirs.fileno()))
        try:
            self.proc = subprocess.Popen(
                cmd,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                cwd="/",
                env=base_env(),
            )
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        forward_lines(out_r, lambda line: self.log.write(line, "stdout"))
        forward_lines(err_r, lambda line: self.log.write(line, "stderr"))
        self._ready = loop.create_future()
        self._channel = _Channel(ours, self._on_message, self._on_eof)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), ZYGOTE_START_TIMEOUT)
        except TimeoutError:
            raise ZygoteFailed("the root zygote did not start") from None

    def _on_message(self, msg: dict[str, Any], _pid: int | None) -> None:
        op, sid = msg.get("op"), str(msg.get("id") or "")
        if op == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(msg)
        elif op in ("spawned", "error") and sid in self._waiting:
            fut = self._waiting.pop(sid)
            if not fut.done():
                fut.set_result(msg)

    def _on_eof(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ZygoteFailed("the root zygote exited while starting"))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ZygoteFailed("the root zygote exited"))
        self._waiting.clear()

    async def spawn(self, sid: str, request: dict[str, Any], fds: list[int]) -> int:
        """Ask for a release zygote; returns the pid of its keeper process on this node."""
        if self._channel is None:
            raise ZygoteFailed("the root zygote is not running")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[sid] = fut
        try:
            self._channel.send({"op": "spawn", "id": sid, **request}, fds)
        except OSError as e:
            self._waiting.pop(sid, None)
            raise ZygoteFailed(f"cannot reach the root zygote: {e}") from e
        reply = await asyncio.wait_for(fut, 30)
        if reply.get("op") != "spawned":
            raise ZygoteFailed(str(reply.get("error")))
        return int(reply["pid"])

    async def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc is not None:
            await _wait_or_kill(self.proc)


@dataclass
class Zygote:
    """One warm interpreter per release (image): it imported the app once and forks instances."""

    image: str
    app: str
    uid: int  # the host uid its sandbox runs as
    code_dir: Path
    deps_dir: Path
    entry: str
    log: LogWriter
    sandbox: dict[str, Any] | None = None
    config: dict[str, Any] | None = None  # {"values": ..., "version": N}
    instance_env: dict[str, str] = field(default_factory=dict)  # for every instance: its app token
    pid: int = 0
    closed: bool = False
    _channel: _Channel | None = None
    _children: dict[str, Child] = field(default_factory=dict)
    _forks: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    _started: asyncio.Future[dict[str, Any]] | None = None
    _last_error: list[str] = field(default_factory=list)
    _configured: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    _real_pid: int | None = None  # the release zygote's host pid, from its `ready`

    async def start(self, root: RootZygote) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        forward_lines(out_r, lambda line: self.log.write_instance(line, "stdout"))
        forward_lines(err_r, self._stderr)
        self._started = loop.create_future()
        self._channel = _Channel(ours, self._on_message, self._on_eof)
        request = {
            "code": str(self.code_dir),
            "deps": str(self.deps_dir),
            "entry": self.entry,
            "sandbox": self.sandbox,
            "config": self.config,  # applied before the app's import: module-level reads see it
        }
        try:
            self.pid = await root.spawn(
                f"z-{self.image[:12]}-{id(self):x}", request, [theirs.fileno(), out_w, err_w]
            )
        except (ZygoteFailed, TimeoutError):
            self._channel.close()
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._started), ZYGOTE_START_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise ZygoteFailed(
                f"the app did not finish importing within {ZYGOTE_START_TIMEOUT:.0f}s"
            ) from None
        if msg.get("op") != "ready":
            await self.stop()
            error = str(msg.get("error") or "").strip() or "\n".join(self._last_error[-1:])
            raise ZygoteFailed(
                error.splitlines()[-1] if error else "the zygote exited while importing the app"
            )

    def _stderr(self, line: str) -> None:
        self.log.write_instance(line, "stderr")
        self._last_error[:] = [*self._last_error[-9:], line]

    def _on_message(self, msg: dict[str, Any], sender: int | None) -> None:
        op, iid = msg.get("op"), str(msg.get("id") or "")
        if op in ("ready", "failed") and not iid:
            if self._started is not None and not self._started.done():
                self._real_pid = sender  # the release zygote itself, as the host numbers it
                self._started.set_result(msg)
            return
        if op == "ready" and iid in self._children:
            # From the new instance itself, before it drops its copy of this socket.
            child = self._children[iid]
            if sender:
                child.pid, child.pid_is_real = sender, True  # the zygote only knows the sandbox's numbering
            if not child.ready.done():
                child.ready.set_result(None)
            return
        # Everything else is the zygote's word: app code may run in an instance that has not yet
        # dropped its copy of this socket, and must not speak for the zygote about its siblings.
        if sender is None or sender != self._real_pid:
            return
        if op == "forked" and iid in self._forks:
            fut = self._forks.pop(iid)
            if not fut.done():
                fut.set_result(int(msg["pid"]))
        elif op == "error" and iid in self._forks:
            fut = self._forks.pop(iid)
            if not fut.done():
                fut.set_exception(ZygoteFailed(str(msg.get("error"))))
        elif op == "recycle" and iid in self._children:
            child = self._children[iid]
            if not child.recycle.done():
                child.recycle.set_result(str(msg.get("reason") or "asked by the instance")[:500])
        elif op == "configured":
            waiter = self._configured.pop(int(msg.get("version", -1)), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(int(msg.get("instances", 0)))
        elif op == "exit" and iid in self._children:
            self._ended(self._children.pop(iid), ExitStatus(msg.get("code"), msg.get("signal")))

    @staticmethod
    def _ended(child: Child, status: ExitStatus) -> None:
        if not child.ready.done():
            child.ready.set_exception(ChildExited(status))
            child.ready.exception()  # retrieved: the exit future carries the news
        if not child.exited.done():
            child.exited.set_result(status)

    def _on_eof(self) -> None:
        """The zygote died: its instances die with it (PDEATHSIG); tell everyone who waits."""
        self.closed = True
        if self._started is not None and not self._started.done():
            self._started.set_result({"op": "failed", "error": ""})
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(ZygoteFailed("the zygote exited"))
        self._forks.clear()
        for child in self._children.values():
            self._ended(child, ExitStatus(None, signal.SIGKILL))
        self._children.clear()

    async def fork(
        self,
        instance_id: str,
        sockets: tuple[socket.socket, socket.socket],
        env: dict[str, str],
        log: LogWriter,
        cgroup_fds: list[int],
        spans: Callable[[str], None] | None = None,
    ) -> Child:
        """A new instance; it listens on `sockets` (web, control: bound, not yet listening), joins
        its cgroups through `cgroup_fds` and writes its output to `log`."""
        if self.closed or self._channel is None:
            raise ZygoteFailed("the zygote is not running")
        loop = asyncio.get_running_loop()
        # Its output; its access lines, apart from it: written many at once (`runtime.applog`); and
        # its finished spans, apart too: `spans` gets each line (node.traces).
        (out_r, out_w), (err_r, err_w), (access_r, access_w), *more = _pipes(3 if spans is None else 4)
        spans_r, spans_w = more[0] if more else (-1, -1)
        child = Child(ready=loop.create_future(), exited=loop.create_future(), recycle=loop.create_future())
        self._children[instance_id] = child
        fut: asyncio.Future[int] = loop.create_future()
        self._forks[instance_id] = fut
        try:
            span_fds = [spans_w] if spans_w >= 0 else []
            self._channel.send(
                {
                    "op": "fork",
                    "id": instance_id,
                    "env": {**self.instance_env, **env},
                    "spans": bool(span_fds),
                    "access": True,
                },
                [out_w, err_w, *(s.fileno() for s in sockets), *span_fds, access_w, *cgroup_fds],
            )
        except (OSError, ZygoteFailed) as e:
            self._children.pop(instance_id, None)
            self._forks.pop(instance_id, None)
            for fd in (out_r, err_r, spans_r, access_r):
                if fd >= 0:
                    os.close(fd)
            raise ZygoteFailed(f"cannot reach the zygote: {e}") from e
        finally:
            for fd in (out_w, err_w, spans_w, access_w):
                if fd >= 0:
                    os.close(fd)
        # The runtime's marked lines (access lines, `logging` records) become records of their own,
        # stamped by the node and not parsed here (`LogWriter.write_instance`).
        child.read_out.append(
            forward_lines(
                out_r,
                lambda line: log.write_instance(line, "stdout"),
                lambda lines: log.write_instance_lines(lines, "stdout", MAX_LINE),
            )
        )
        for fd in (err_r, access_r):  # anything but access lines on the second is the app's: stderr
            child.read_out.append(
                forward_lines(
                    fd,
                    lambda line: log.write_instance(line, "stderr"),
                    lambda lines: log.write_instance_lines(lines, "stderr", MAX_LINE),
                )
            )
        if spans is not None:
            child.read_out.append(forward_lines(spans_r, spans))
        try:
            inner = await asyncio.wait_for(fut, 10)
        except (TimeoutError, ZygoteFailed):
            self._children.pop(instance_id, None)
            self._forks.pop(instance_id, None)
            raise
        if not child.pid_is_real:  # `ready` may have come in the same read and told the real pid
            child.pid, child.pid_is_real = inner, self.sandbox is None
        return child

    async def configure(self, values: dict[str, Any], version: int, timeout: float = 10.0) -> int:
        """Push a config to the zygote and, through it, to its instances; returns how many got it."""
        if self.closed or self._channel is None:
            raise ZygoteFailed("the zygote is not running")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._configured[version] = fut
        self.config = {"values": values, "version": version}
        try:
            self._channel.send({"op": "config", "values": values, "version": version})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._configured.pop(version, fut)

    async def stop(self) -> None:
        """Close the control socket: the zygote ends its instances, then itself."""
        self.closed = True
        if self._channel is not None:
            self._channel.close()
        if self.pid:
            for _ in range(60):
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return
                await asyncio.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


async def _wait_or_kill(proc: subprocess.Popen[bytes]) -> None:
    for _ in range(60):
        if proc.poll() is not None:
            return
        await asyncio.sleep(0.05)
    proc.kill()
    await asyncio.to_thread(proc.wait)


def _pipes(count: int) -> list[tuple[int, int]]:
    """`count` pipes, or none: out of descriptors, those already made are closed, not leaked."""
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.extend(os.pipe())
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return list(zip(fds[::2], fds[1::2], strict=True))


def forward_lines(
    fd: int, emit: Callable[[str], None], block: Callable[[bytes], None] | None = None
) -> asyncio.Future[None]:
    """Read `fd` on the loop and hand each complete line to `emit` (cut at MAX_LINE bytes); close
    it at EOF, when the future it returns is done. With `block`, the complete lines of each read go
    to it together instead, as bytes ending with a newline, uncut (`block` cuts them:
    `LogWriter.write_instance_lines`)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    os.set_blocking(fd, False)
    buf = bytearray()
    skipping = False  # the line under way passed MAX_LINE: the rest of it is dropped as it comes

    def on_readable() -> None:
        nonlocal skipping
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if skipping:
                end = data.find(b"\n")
                if end < 0:
                    return
                skipping, data = False, data[end + 1 :]
            buf.extend(data)
            if block is not None:
                end = buf.rfind(b"\n") + 1
                if end:
                    whole = bytes(buf[:end])
                    del buf[:end]
                    block(whole)
            else:
                *lines, rest = buf.split(b"\n")
                buf[:] = rest  # first: a line `emit` failed on is not read again with the next
                for line in lines:
                    emit(line[:MAX_LINE].decode("utf-8", "replace"))
            # An app that never ends its line must not make this buffer (and each split of it) grow.
            if len(buf) > MAX_LINE:
                head = buf[:MAX_LINE].decode("utf-8", "replace")
                buf.clear()
                skipping = True
                emit(head)
            return
        # Whatever `emit` does with the last line: a reader left at EOF would be called at once, forever.
        loop.remove_reader(fd)
        os.close(fd)
        try:
            if buf:
                emit(buf.decode("utf-8", "replace"))
        finally:
            if not ended.done():
                ended.set_result(None)

    loop.add_reader(fd, on_readable)
    return ended


def base_env() -> dict[str, str]:
    """What the runtime inherits from the host: little, and nothing secret."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
