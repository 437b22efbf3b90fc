"""The node API's debug session: debugpy in an instance, its TCP stream carried over a websocket
(`osless debug attach`, issue 14). Only the API opens it, with a `debugger` token it made for this
node and app (the API checked the caller's `debug` permission and audits the session).

    WS /debug/apps/{app}/instances/{instance}/attach?timeout=S&rotation=leave|keep

The node asks the instance to start debugpy (`POST /debug/listen` on its control socket, which only
the node reaches: `runtime.debugger`), which listens on 127.0.0.1 in the instance's own network
namespace. The sandbox has no other network, so the node connects from inside that namespace: a
thread of its own enters it (`setns` on `/proc/PID/ns/net`; only that thread moves), makes the
socket there and comes back; the socket stays the namespace's. Then binary frames carry the bytes
both ways until either side closes or the timeout passes. Meanwhile the instance has no health
checks (a breakpoint stops its loop) and, unless `rotation=keep`, is out of the gateway's rotation;
after, it is replaced by a fresh one (`Supervisor.debug_session`). One session per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

if TYPE_CHECKING:
    from osless.node.api import Callers
    from osless.node.supervisor import Supervisor

__all__ = ["MAX_TIMEOUT_S", "Attacher", "Refused", "routes"]

MAX_TIMEOUT_S = 4 * 3600.0
CHUNK = 64 * 1024  # bytes of one frame, either way
LISTEN_TIMEOUT_S = 15.0  # for debugpy to start in the instance (pydevd's import, its threads)
CONNECT_TIMEOUT_S = 5.0
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")
_CLONE_NEWNET = 0x40000000


class Refused(Exception):
    """The session cannot start: (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _connect_in(pid: int, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port in the network namespace of process `pid`, made from a
    thread of its own that enters that namespace and leaves it again (setns moves the calling
    thread only); a thread that could not come back ends without running anything else."""
    done: list[socket.socket | BaseException] = []

    def enter() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                finally:
                    try:
                        _setns(own)
                    except OSError:
                        sock.close()
                        raise
            finally:
                os.close(target)
            sock.settimeout(CONNECT_TIMEOUT_S)
            try:
                sock.connect(("127.0.0.1", port))
            except BaseException:
                sock.close()
                raise
            sock.setblocking(False)
            done.append(sock)
        except BaseException as e:
            done.append(e)
        finally:
            os.close(own)

    thread = threading.Thread(target=enter, name="osless-attach-setns", daemon=True)
    thread.start()
    thread.join()
    if not done:
        raise OSError("the connecting thread ended without a word")
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


async def _listen(control: str) -> int:
    """Ask the instance (its control socket) to start debugpy; the port it listens on."""
    reader, writer = await asyncio.open_unix_connection(control)
    try:
        writer.write(
            b"POST /debug/listen HTTP/1.1\r\nHost: instance\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read(16384)  # the instance is the app's: a bounded answer
        while len(answer) < 16384 and (more := await reader.read(16384 - len(answer))):
            answer += more
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status = answer.split(b"\r\n", 1)[0]
    body = answer.partition(b"\r\n\r\n")[2]
    try:
        said = json.loads(body)
    except ValueError:
        said = None
    if not status.startswith(b"HTTP/1.1 200 "):
        error = said.get("error") if isinstance(said, dict) else None
        why = error.get("message") if isinstance(error, dict) else None
        raise Refused(503, "debugger_failed", str(why or status.decode("latin-1"))[:300])
    port = said.get("port") if isinstance(said, dict) else None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise Refused(503, "debugger_failed", "the instance did not say where debugpy listens")
    return port


class Attacher:
    """Debug sessions of the node agent's instances, one per instance at a time."""

    def __init__(self, supervisors: Mapping[str, Supervisor]) -> None:
        self.supervisors = supervisors
        self._attached: set[str] = set()

    def _supervisor(self, app: str, instance: str) -> Supervisor:
        sup = self.supervisors.get(instance)
        if sup is None or sup.app != app or sup.status.get("phase") != "ready":
            raise Refused(404, "instance_not_found", f"no running instance {instance} of {app} on this node")
        if instance in self._attached:
            raise Refused(409, "attached", f"a debugger is attached to instance {instance} already")
        return sup

    async def open(self, app: str, instance: str) -> tuple[Supervisor, socket.socket]:
        """debugpy started in the instance and a connection to it, the instance held for the session
        until `serve` (or the caller, on an error after this) calls `release`."""
        sup = self._supervisor(app, instance)
        self._attached.add(instance)
        try:
            return sup, await self._connect(sup, instance)
        except BaseException:
            self._attached.discard(instance)
            raise

    def release(self, instance: str) -> None:
        self._attached.discard(instance)

    async def _connect(self, sup: Supervisor, instance: str) -> socket.socket:
        pid, uid, control = sup.status.get("pid"), sup.status.get("uid"), sup.status.get("control")
        gone = Refused(404, "instance_not_found", f"instance {instance} is not running now")
        if not isinstance(pid, int) or not isinstance(control, str):
            raise gone
        try:  # the pid still the instance's, not reused since it ended: it runs as the app's uid
            if os.stat(f"/proc/{pid}").st_uid != uid:
                raise gone
        except OSError:
            raise gone from None
        try:
            port = await asyncio.wait_for(_listen(control), LISTEN_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise Refused(503, "debugger_failed", f"instance {instance} did not start debugpy: {e}") from None
        try:
            return await asyncio.to_thread(_connect_in, pid, port)
        except OSError as e:
            raise Refused(
                503, "debugger_failed", f"cannot reach debugpy in instance {instance}: {e}"
            ) from None

    async def serve(
        self,
        websocket: WebSocket,
        instance: str,
        sup: Supervisor,
        sock: socket.socket,
        timeout_s: float,
        keep: bool,
    ) -> None:
        """The session over the accepted `websocket` until either end closes or `timeout_s` passes."""
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
            async with sup.debug_session(leave_rotation=not keep):
                reason = await _relay(websocket, reader, writer, timeout_s)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                await _close(websocket, 1000, reason)
        finally:
            self.release(instance)
            sock.close()


async def _relay(
    websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
) -> str:
    """Bytes both ways; why it ended."""

    async def up() -> str:  # the debugger's client to debugpy
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return "the client went"
            data = msg.get("bytes")
            if data:
                writer.write(data)
                await writer.drain()

    async def down() -> str:
        while chunk := await reader.read(CHUNK):
            await websocket.send_bytes(chunk)
        return "debugpy closed the connection"

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return f"the session's time ({timeout_s:g}s) is up"
        task = done.pop()
        try:
            return task.result()
        except (OSError, WebSocketDisconnect, RuntimeError) as e:
            return f"the connection broke: {e}"[:100]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code, reason.encode()[:120].decode("utf-8", "ignore"))


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def routes(attacher: Attacher, callers: Callers) -> list[WebSocketRoute]:
    async def attach(websocket: WebSocket) -> None:
        app, instance = websocket.path_params["app"], websocket.path_params["instance"]
        q = websocket.query_params
        refused: Response | None = None
        try:
            timeout_s = float(q.get("timeout", "1800"))
        except ValueError:
            timeout_s = -1.0
        if not _NAME.fullmatch(app):
            refused = _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        elif not _NAME.fullmatch(instance):
            refused = _error(400, "invalid_request", f"{instance[:100]!r} is not an instance id")
        elif not 0 < timeout_s <= MAX_TIMEOUT_S:
            refused = _error(400, "invalid_request", f"timeout must be seconds in (0, {MAX_TIMEOUT_S:g}]")
        elif q.get("rotation", "leave") not in ("leave", "keep"):
            refused = _error(400, "invalid_request", "rotation must be leave or keep")
        else:
            refused = await callers.check(websocket, "sample", app)
        if refused is not None:
            await websocket.send_denial_response(refused)
            return
        try:  # before the websocket opens, so the API says a failure as this answer
            sup, sock = await attacher.open(app, instance)
        except Refused as e:
            await websocket.send_denial_response(_error(e.status, e.code, e.message))
            return
        try:
            await websocket.accept()
        except BaseException:
            attacher.release(instance)
            sock.close()
            raise
        await attacher.serve(websocket, instance, sup, sock, timeout_s, q.get("rotation") == "keep")

    return [WebSocketRoute("/debug/apps/{app}/instances/{instance}/attach", attach)]
