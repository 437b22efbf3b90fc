"""The single spawn path: start a release's zygote, fork instances from it, collect their output.

Everything that creates a process for app code goes through `Zygote`: the sandbox work (namespaces,
cgroups, seccomp) belongs here and in `osless.runtime.zygote`, nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osless.logs import LogWriter
from osless.runtime import protocol

__all__ = ["ExitStatus", "Zygote", "ZygoteFailed"]

ZYGOTE_START_TIMEOUT = 60.0


class ZygoteFailed(Exception):
    """The release's zygote could not import the app (the message ends with the error)."""


@dataclass
class ExitStatus:
    code: int | None
    signal: int | None


@dataclass
class _Child:
    ready: asyncio.Future[None]
    exited: asyncio.Future[ExitStatus]
    pid: int = 0


@dataclass
class Zygote:
    """One warm interpreter per release (image): it imported the app once and forks instances."""

    image: str
    code_dir: Path
    deps_dir: Path
    entry: str
    log: LogWriter
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    _sock: socket.socket | None = None
    _children: dict[str, _Child] = field(default_factory=dict)
    _forks: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    _started: asyncio.Future[dict[str, Any]] | None = None
    _readers: list[int] = field(default_factory=list)
    closed: bool = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        cmd = [
            sys.executable,
            "-s",
            "-m",
            "osless.runtime.zygote",
            "--code",
            str(self.code_dir),
            "--deps",
            str(self.deps_dir),
            "--entry",
            self.entry,
            "--control-fd",
            str(theirs.fileno()),
        ]
        try:
            self.proc = subprocess.Popen(
                cmd,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env={**_base_env(), "OSLESS_IMAGE": self.image},
            )
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        self.pid = self.proc.pid
        self._sock = ours
        ours.setblocking(False)
        self._started = loop.create_future()
        self._pipe_to_log(out_r, "stdout")
        self._pipe_to_log(err_r, "stderr")
        loop.add_reader(ours.fileno(), self._on_control)
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._started), ZYGOTE_START_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise ZygoteFailed(
                f"the app did not finish importing within {ZYGOTE_START_TIMEOUT:.0f}s"
            ) from None
        if msg.get("op") != "ready":
            await self.stop()
            error = str(msg.get("error") or "the zygote exited while importing the app").strip()
            raise ZygoteFailed(error.splitlines()[-1] if error else "zygote failed")

    def _pipe_to_log(self, fd: int, stream: str) -> None:
        _forward_lines(fd, lambda line: self.log.write(line, stream), self._readers)

    def _on_control(self) -> None:
        assert self._sock is not None
        while True:
            try:
                msg, fds = protocol.recv(self._sock)
            except BlockingIOError:
                return
            except (OSError, protocol.ProtocolError):
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._on_eof()
                return
            self._dispatch(msg)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op, iid = msg.get("op"), str(msg.get("id", ""))
        if op in ("ready", "failed") and not iid:
            if self._started is not None and not self._started.done():
                self._started.set_result(msg)
        elif op == "forked" and iid in self._forks:
            fut = self._forks.pop(iid)
            if not fut.done():
                fut.set_result(int(msg["pid"]))
        elif op == "ready" and iid in self._children:
            child = self._children[iid]
            if not child.ready.done():
                child.ready.set_result(None)
        elif op == "exit" and iid in self._children:
            child = self._children.pop(iid)
            status = ExitStatus(msg.get("code"), msg.get("signal"))
            if not child.ready.done():
                child.ready.set_exception(ChildExited(status))
                child.ready.exception()  # mark retrieved: the exit future carries the news
            if not child.exited.done():
                child.exited.set_result(status)

    def _on_eof(self) -> None:
        """The zygote died: its instances die with it (PDEATHSIG); tell everyone who waits."""
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self.closed = True
        if self._started is not None and not self._started.done():
            self._started.set_result({"op": "failed", "error": "the zygote exited while importing the app"})
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(ZygoteFailed("the zygote exited"))
        self._forks.clear()
        for child in self._children.values():
            status = ExitStatus(None, signal.SIGKILL)  # what PDEATHSIG did to it
            if not child.ready.done():
                child.ready.set_exception(ChildExited(status))
                child.ready.exception()
            if not child.exited.done():
                child.exited.set_result(status)
        self._children.clear()

    async def fork(self, instance_id: str, sock_path: Path, env: dict[str, str], log: LogWriter) -> _Child:
        """Ask the zygote for a new instance; its output goes to `log`."""
        if self.closed or self._sock is None:
            raise ZygoteFailed("the zygote is not running")
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child = _Child(ready=loop.create_future(), exited=loop.create_future())
        self._children[instance_id] = child
        fut: asyncio.Future[int] = loop.create_future()
        self._forks[instance_id] = fut
        try:
            protocol.send(
                self._sock,
                {"op": "fork", "id": instance_id, "socket": str(sock_path), "env": env},
                [out_w, err_w],
            )
        except OSError as e:
            self._children.pop(instance_id, None)
            self._forks.pop(instance_id, None)
            for fd in (out_r, err_r):
                os.close(fd)
            raise ZygoteFailed(f"cannot reach the zygote: {e}") from e
        finally:
            os.close(out_w)
            os.close(err_w)
        readers: list[int] = []
        _forward_lines(out_r, lambda line: log.write(line, "stdout"), readers)
        _forward_lines(err_r, lambda line: log.write(line, "stderr"), readers)
        child.pid = await asyncio.wait_for(fut, 10)
        return child

    async def stop(self) -> None:
        """Close the control socket: the zygote ends its instances, then itself."""
        self.closed = True
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            for _ in range(50):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


class ChildExited(Exception):
    """The instance exited before it was ready."""

    def __init__(self, status: ExitStatus) -> None:
        super().__init__(f"exited before ready: code={status.code} signal={status.signal}")
        self.status = status


def _forward_lines(fd: int, emit: Callable[[str], None], registry: list[int]) -> None:
    """Read `fd` on the loop and hand each complete line to `emit`; close it at EOF."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    registry.append(fd)

    def on_readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            buf.extend(data)
            *lines, rest = buf.split(b"\n")
            for line in lines:
                emit(line.decode("utf-8", "replace")[:16384])
            buf[:] = rest
            return
        if buf:
            emit(buf.decode("utf-8", "replace"))
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, on_readable)


def _base_env() -> dict[str, str]:
    """What an instance inherits from the host: little, and nothing secret."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
