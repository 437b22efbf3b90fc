"""One-off commands on this node (`osless run`, release steps), as the API asks over `WS /runs/{app}`.

Each runs in a fresh sandbox of its release, made as a release zygote's is (`NodeAgent.sandbox_for`:
the image's layers, the app's uid, volumes and egress), through `runtime.jail` (the sandbox
machinery the build uses), in a cgroup with an instance's limits. Its environment is what an
instance has: the app's token, and its config as `OSLESS_CONFIG`, which the SDK reads at import
(`sdk.config`). Output goes back as it comes, stdin comes in; the command ends when it exits, at its
timeout, when asked (`stop`), or when the API's socket closes. See `runwire` for the frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import struct
import sys
import termios
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from osless import runwire
from osless.node.cgroups import InstanceCgroup, Limits
from osless.node.images import ImageError
from osless.node.spawn import ZygoteFailed, base_env
from osless.runtime.jail import EXEC_ENV

if TYPE_CHECKING:
    from osless.node.agent import NodeAgent

__all__ = ["NodeRuns"]

log = logging.getLogger("osless.node.runs")

_DIGEST = re.compile(r"[0-9a-f]{64}")
START_TIMEOUT_S = 10.0  # for the API's start message
# Environment names the API may set for the command: what an instance has, and its config.
ALLOWED_ENV = frozenset({"OSLESS_APP", "OSLESS_RELEASE", "OSLESS_TOKEN", "OSLESS_CONFIG", "OSLESS_RUN"})


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeRuns:
    """The node API's runner (`node.api.Runner`): one call per command, on the node's loop."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def serve(self, ws: WebSocket, app: str) -> None:
        try:
            start = await asyncio.wait_for(ws.receive_json(), START_TIMEOUT_S)
            image, uid, command, env, timeout_s = _start(start)
            tty = runwire.tty_size(start.get("tty"))
        except (TimeoutError, ValueError, KeyError, TypeError, WebSocketDisconnect) as e:
            await _end(ws, {"op": "error", "code": "invalid_request", "message": f"no valid start: {e}"})
            return
        agent = self.agent
        agent.runs[app] += 1
        agent.run_images[image] += 1
        cgroup: InstanceCgroup | None = None
        proc: asyncio.subprocess.Process | None = None
        terminal: _Terminal | None = None
        try:
            terminal = _Terminal(*tty) if tty is not None else None
            # A terminal's end for the command's stdin, stdout and stderr (docker run -it), else pipes.
            stdio: Any = terminal.slave if terminal is not None else asyncio.subprocess.PIPE
            manifest = await agent.images.manifest(image)
            if manifest.app != app:
                raise _Refused("wrong_app", f"image {image[:12]} is not of app {app!r}")
            layers = await agent.images.layers(image)
            code_dir, deps_dir = layers["code"], layers["deps"]
            env = {
                **base_env(),
                **env,
                # As an instance imports: the app's layers, then the runtime layer (never the
                # platform's virtualenv); `python` is the runtime's interpreter.
                "PATH": f"{deps_dir}/bin:{agent.runtime.bin}:/usr/local/bin:/usr/bin:/bin",
                "PYTHONPATH": f"{code_dir}:{deps_dir}:{agent.runtime.path}",
                "PYTHONNOUSERSITE": "1",
            }
            if agent.cgroups is not None:
                cgroup = agent.cgroups.create(Limits(memory_mb=manifest.memory_mb()))
            if agent.sandboxed:
                spec = await agent.sandbox_for(uid, manifest, layers)
                join = cgroup.open_join_files() if cgroup is not None else []
                how = {"env": env, "cwd": str(code_dir), "cgroup_fds": join, "tty": terminal is not None}
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *(
                            sys.executable,
                            "-s",
                            "-P",
                            "-m",
                            "osless.runtime.jail",
                            json.dumps(spec.to_json()),
                        ),
                        *("--", *command),
                        stdin=stdio,
                        stdout=stdio,
                        stderr=stdio,
                        env={**base_env(), EXEC_ENV: json.dumps(how)},
                        pass_fds=join,
                        cwd="/",
                        start_new_session=True,
                    )
                finally:
                    for fd in join:
                        os.close(fd)
            else:  # this host gives no sandbox (said loudly at start): as its instances run
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *command,
                        stdin=stdio,
                        stdout=stdio,
                        stderr=stdio,
                        env=env,
                        cwd=str(code_dir),
                        start_new_session=True,
                    )
                except OSError as e:
                    raise _Refused("not_runnable", f"{command[0]}: {e.strerror or e}") from None
            if terminal is not None:
                terminal.started()
            await self._relay(ws, proc, timeout_s, terminal)
        except _Refused as e:
            await _end(ws, {"op": "error", "code": e.code, "message": e.message})
        except (ImageError, ZygoteFailed, OSError, ValueError) as e:
            log.warning("a command of %s could not start: %s", app, e)
            await _end(
                ws, {"op": "error", "code": "not_started", "message": f"the command could not start: {e}"}
            )
        finally:
            if proc is not None and proc.returncode is None:
                _kill(proc)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            if cgroup is not None:
                await asyncio.to_thread(cgroup.kill_all)  # nothing it started outlives it
                cgroup.remove()
            if terminal is not None:
                terminal.close()
            agent.runs[app] -= 1
            agent.run_images[image] -= 1
            if agent.runs[app] <= 0:
                del agent.runs[app]
            if agent.run_images[image] <= 0:
                del agent.run_images[image]
            with contextlib.suppress(Exception):
                await agent.forget_egress(app)

    async def _relay(
        self, ws: WebSocket, proc: asyncio.subprocess.Process, timeout_s: float, terminal: _Terminal | None
    ) -> None:
        if terminal is not None:
            outs = [(await terminal.reader(), runwire.STDOUT)]
        else:
            assert proc.stdout is not None and proc.stderr is not None
            outs = [(proc.stdout, runwire.STDOUT), (proc.stderr, runwire.STDERR)]
        stdin = proc.stdin

        async def out(stream: asyncio.StreamReader, tag: int) -> None:
            with contextlib.suppress(OSError):  # a terminal says EIO once its last user is gone
                while chunk := await stream.read(runwire.MAX_CHUNK):
                    await ws.send_bytes(bytes([tag]) + chunk)

        async def finished() -> int:
            await asyncio.gather(*(out(stream, tag) for stream, tag in outs))
            return await proc.wait()

        async def incoming() -> None:
            """The API's frames, until it says stop or goes."""
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data, text = msg.get("bytes"), msg.get("text")
                if data and data[0] == runwire.STDIN:
                    if terminal is not None:
                        await terminal.write(data[1:])
                    elif stdin is not None and not stdin.is_closing():
                        stdin.write(data[1:])
                        with contextlib.suppress(ConnectionError):
                            await stdin.drain()
                elif text is not None:
                    op, msg_ = _message(text)
                    if op == "eof" and stdin is not None:
                        stdin.close()
                    elif (
                        op == "resize"
                        and terminal is not None
                        and (size := runwire.tty_size(msg_)) is not None
                    ):
                        terminal.resize(*size)
                    elif op == "stop":
                        return

        done_task = asyncio.create_task(finished())
        in_task = asyncio.create_task(incoming())
        try:
            done, _ = await asyncio.wait(
                {done_task, in_task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if done_task in done:
                await _end(ws, {"op": "exit", "code": done_task.result()})
                return
            _kill(proc)
            if in_task in done:  # stopped, or the API went: nobody reads what it says now
                with contextlib.suppress(Exception):
                    await _end(ws, {"op": "exit", "code": 128 + signal.SIGKILL})
                return
            note = f"osless: the command ran past its timeout ({timeout_s:g} s) and was ended\n"
            with contextlib.suppress(Exception):
                await ws.send_bytes(bytes([runwire.STDERR]) + note.encode())
            await _end(ws, {"op": "exit", "code": runwire.TIMEOUT_EXIT})
        finally:
            for task in (done_task, in_task):
                task.cancel()
            await asyncio.gather(done_task, in_task, return_exceptions=True)


def _start(msg: Any) -> tuple[str, int, list[str], dict[str, str], float]:
    """The API's start message, checked: (image, uid, command, env, timeout)."""
    if not isinstance(msg, dict) or msg.get("op") != "start":
        raise ValueError("the first message must be a start")
    image, uid, command, env, timeout_s = (msg[k] for k in ("image", "uid", "command", "env", "timeout_s"))
    if not isinstance(image, str) or not _DIGEST.fullmatch(image):
        raise ValueError("image must be a sha256 digest")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 1000:
        raise ValueError("uid must be the app's (an integer >= 1000)")
    problem = runwire.command_problem(command)
    if problem:
        raise ValueError(problem)
    if not isinstance(env, dict) or not all(k in ALLOWED_ENV and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"env may set only {sorted(ALLOWED_ENV)}, as text")
    if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= runwire.MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be a number of seconds in (0, {runwire.MAX_TIMEOUT_S:g}]")
    return image, uid, command, env, float(timeout_s)


def _message(text: str) -> tuple[str | None, dict[str, Any]]:
    with contextlib.suppress(ValueError):
        msg = json.loads(text)
        if isinstance(msg, dict) and isinstance(msg.get("op"), str):
            return str(msg["op"]), msg
    return None, {}


class _Terminal:
    """A pseudo-terminal for a command: the slave its stdio (and, in the sandbox, its controlling
    terminal: `runtime.jail`), the master read and written here."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self._transport: asyncio.BaseTransport | None = None

    def started(self) -> None:
        """The command holds the slave now: ours goes, so the master reads EOF (EIO) once it ends."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    async def reader(self) -> asyncio.StreamReader:
        reader = asyncio.StreamReader(limit=runwire.MAX_CHUNK)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(self.master), "rb", 0)
        )
        return reader

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for _ in range(1000):  # a terminal's input queue is small: a command that reads none stalls us
            if not view:
                return
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                return

    def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        self.started()
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(OSError):
            os.close(self.master)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """The jail leads its own session; its sandbox dies with it (PDEATHSIG), the cgroup catches the rest."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _end(ws: WebSocket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await ws.send_json(msg)
        await ws.close()
