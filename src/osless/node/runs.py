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
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
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
        except (TimeoutError, ValueError, KeyError, TypeError, WebSocketDisconnect) as e:
            await _end(ws, {"op": "error", "code": "invalid_request", "message": f"no valid start: {e}"})
            return
        agent = self.agent
        agent.runs[app] += 1
        agent.run_images[image] += 1
        cgroup: InstanceCgroup | None = None
        proc: asyncio.subprocess.Process | None = None
        try:
            manifest = await agent.images.manifest(image)
            if manifest.app != app:
                raise _Refused("wrong_app", f"image {image[:12]} is not of app {app!r}")
            layers = await agent.images.layers(image)
            code_dir, deps_dir = layers["code"], layers["deps"]
            env = {
                **base_env(),
                **env,
                "PATH": f"{deps_dir}/bin:{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
                "PYTHONPATH": f"{code_dir}:{deps_dir}",
            }
            if agent.cgroups is not None:
                cgroup = agent.cgroups.create(Limits(memory_mb=manifest.memory_mb()))
            if agent.sandboxed:
                spec = await agent.sandbox_for(uid, manifest, layers)
                join = cgroup.open_join_files() if cgroup is not None else []
                how = {"env": env, "cwd": str(code_dir), "cgroup_fds": join}
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
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
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
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                        env=env,
                        cwd=str(code_dir),
                        start_new_session=True,
                    )
                except OSError as e:
                    raise _Refused("not_runnable", f"{command[0]}: {e.strerror or e}") from None
            await self._relay(ws, proc, timeout_s)
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
            agent.runs[app] -= 1
            agent.run_images[image] -= 1
            if agent.runs[app] <= 0:
                del agent.runs[app]
            if agent.run_images[image] <= 0:
                del agent.run_images[image]
            with contextlib.suppress(Exception):
                await agent.forget_egress(app)

    async def _relay(self, ws: WebSocket, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        stdin = proc.stdin

        async def out(stream: asyncio.StreamReader, tag: int) -> None:
            while chunk := await stream.read(runwire.MAX_CHUNK):
                await ws.send_bytes(bytes([tag]) + chunk)

        async def finished() -> int:
            await asyncio.gather(out(proc.stdout, runwire.STDOUT), out(proc.stderr, runwire.STDERR))  # type: ignore[arg-type]
            return await proc.wait()

        async def incoming() -> None:
            """The API's frames, until it says stop or goes."""
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data, text = msg.get("bytes"), msg.get("text")
                if data and data[0] == runwire.STDIN and not stdin.is_closing():
                    stdin.write(data[1:])
                    with contextlib.suppress(ConnectionError):
                        await stdin.drain()
                elif text is not None:
                    op = _op(text)
                    if op == "eof":
                        stdin.close()
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


def _op(text: str) -> str | None:
    with contextlib.suppress(ValueError):
        msg = json.loads(text)
        if isinstance(msg, dict) and isinstance(msg.get("op"), str):
            return str(msg["op"])
    return None


def _kill(proc: asyncio.subprocess.Process) -> None:
    """The jail leads its own session; its sandbox dies with it (PDEATHSIG), the cgroup catches the rest."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _end(ws: WebSocket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await ws.send_json(msg)
        await ws.close()
