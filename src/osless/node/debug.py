"""The node API's debug routes: an instance's Python stacks and a sampling profile, taken from
outside the process with py-spy (`osless debug stack|profile`, issue 14), the app cooperating in
nothing. Only the API calls them, with a token it made for this node and app (`debugger` role, a
minute); the API checked the caller's `debug` permission and records the call in its audit log.

    POST /debug/apps/{app}/instances/{instance}/stack                        every thread's stack (JSON)
    POST /debug/apps/{app}/instances/{instance}/profile?seconds=N&format=F   a flame graph (svg|speedscope)

py-spy runs as the node (root on the host) against the instance's host pid, which the instance's
`ready` message told its supervisor: root of the initial user namespace may ptrace into the
sandbox's user and pid namespaces (no Yama here; with Yama's ptrace_scope 1 or 2 root still can,
3 forbids it). What it reads is the app's memory, so nothing it says is trusted: its run is
time-limited (killed past it), its output read up to a cap, at most MAX_RUNNING at once on the node
(429 past it), one profile of an instance at a time (409), and no local variables are asked for
(`--locals` would show the app's secrets in memory to anyone with `debug`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from osless.node.api import Callers
    from osless.node.supervisor import Supervisor

__all__ = [
    "MAX_OUTPUT_BYTES",
    "MAX_SECONDS",
    "Busy",
    "Crowded",
    "Failed",
    "Profiler",
    "routes",
    "supervised_pids",
]

MAX_SECONDS = 60
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # a dump's JSON or a profile's file; past it the call fails
STACK_TIMEOUT_S = 20.0  # a dump takes milliseconds; one that hangs on what the app's memory holds is killed
PROFILE_SLACK_S = 20.0  # past its seconds, for py-spy to write its file
MAX_FRAMES = 512  # of one thread, kept from the innermost
MAX_THREADS = 1024
MAX_TEXT = 512  # characters of a function or file name
MAX_RUNNING = 8  # py-spy runs at once on a node, all instances together: past it, 429
FORMATS = {"svg": "flamegraph", "speedscope": "speedscope"}
_APP = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")
_INSTANCE = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")

# What the node knows of an instance: its host pid while ready, else None.
Pids = Callable[[str, str], int | None]


def supervised_pids(supervisors: Mapping[str, Supervisor]) -> Pids:
    """The host pid of an instance of the node agent's own, ready now, of that app; else None."""

    def pid(app: str, instance: str) -> int | None:
        sup = supervisors.get(instance)
        if sup is None or sup.app != app or sup.status.get("phase") != "ready":
            return None
        found, uid = sup.status.get("pid"), sup.status.get("uid")
        if not isinstance(found, int) or found <= 0:
            return None
        try:  # the pid still the instance's, not reused since it ended: it runs as the app's uid
            return found if os.stat(f"/proc/{found}").st_uid == uid else None
        except OSError:
            return None

    return pid


class Failed(Exception):
    """py-spy could not do it; the message says why."""


class Busy(Exception):
    """A profile of this instance is already running."""


class Crowded(Exception):
    """The node runs MAX_RUNNING py-spy already."""


def _py_spy() -> str:
    """py-spy as installed with osless (a dependency: its wheel ships the binary next to Python)."""
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if found is None:
        raise Failed("py-spy is not installed on this node (it comes with osless: run scripts/install)")
    return found


async def _read(stream: asyncio.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes, the rest read and dropped: py-spy never blocks on a full pipe."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept)


async def _run(args: list[str], timeout: float) -> bytes:
    """py-spy's stdout (at most MAX_OUTPUT_BYTES), killed past `timeout`."""
    proc = await asyncio.create_subprocess_exec(
        _py_spy(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        out, err = await asyncio.wait_for(
            asyncio.gather(_read(proc.stdout, MAX_OUTPUT_BYTES + 1), _read(proc.stderr, 64 * 1024)), timeout
        )
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        raise Failed(f"py-spy gave no answer within {timeout:.0f}s and was stopped") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if len(out) > MAX_OUTPUT_BYTES:
        raise Failed(f"py-spy's answer passed {MAX_OUTPUT_BYTES} bytes")
    if proc.returncode != 0:
        said = err.decode("utf-8", "replace").strip().splitlines()  # py-spy's own words, not the app's
        raise Failed(f"py-spy failed: {said[-1][:500] if said else f'exit {proc.returncode}'}")
    return out


def _text(value: Any) -> str:
    return str(value)[:MAX_TEXT] if value is not None else ""


def _threads(raw: bytes) -> list[dict[str, Any]]:
    """py-spy's JSON dump as the API says it: each thread's name and frames (innermost first), nothing
    of the process's command line (the platform's paths) and no locals."""
    try:
        dumped = json.loads(raw)
    except ValueError:
        raise Failed("py-spy's dump was not JSON") from None
    if not isinstance(dumped, list):
        raise Failed("py-spy's dump was not a list of threads")
    threads = []
    for t in dumped[:MAX_THREADS]:
        if not isinstance(t, dict):
            continue
        raw_frames = t.get("frames")
        frames: list[Any] = raw_frames if isinstance(raw_frames, list) else []
        threads.append(
            {
                "name": _text(t.get("thread_name")),
                "thread_id": t.get("os_thread_id") if isinstance(t.get("os_thread_id"), int) else None,
                "active": bool(t.get("active")),
                "owns_gil": bool(t.get("owns_gil")),
                "frames": [
                    {
                        "function": _text(f.get("name")),
                        "file": _text(f.get("filename")),
                        "line": f.get("line") if isinstance(f.get("line"), int) else None,
                    }
                    for f in frames[:MAX_FRAMES]
                    if isinstance(f, dict)
                ],
            }
        )
    return threads


class Profiler:
    """py-spy against the node's instances: at most one profile of an instance at a time."""

    def __init__(self, pids: Pids) -> None:
        self.pids = pids
        self._profiling: set[str] = set()
        self._running = 0

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._running >= MAX_RUNNING:
            raise Crowded(f"this node takes {MAX_RUNNING} stacks or profiles at once already; try again soon")
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    def _pid(self, app: str, instance: str) -> int:
        pid = self.pids(app, instance)
        if pid is None:
            raise LookupError(f"no running instance {instance} of {app} on this node")
        return pid

    async def stack(self, app: str, instance: str) -> list[dict[str, Any]]:
        pid = self._pid(app, instance)
        with self._slot():
            return _threads(await _run(["dump", "--json", "--pid", str(pid)], STACK_TIMEOUT_S))

    async def profile(self, app: str, instance: str, seconds: int, fmt: str) -> bytes:
        pid = self._pid(app, instance)
        if instance in self._profiling:
            raise Busy(f"instance {instance} is being profiled already; wait for that profile to end")
        self._profiling.add(instance)
        try:
            with self._slot(), tempfile.TemporaryDirectory(prefix="osless-profile-") as tmp:
                out = Path(tmp) / "profile"
                args = ["record", "--pid", str(pid), "--duration", str(seconds), "--nonblocking"]
                args += ["--format", FORMATS[fmt], "--output", str(out)]
                await _run(args, seconds + PROFILE_SLACK_S)
                try:
                    size = os.stat(out).st_size
                except FileNotFoundError:
                    raise Failed("py-spy wrote no profile (did the instance stop?)") from None
                if size > MAX_OUTPUT_BYTES:
                    raise Failed(f"the profile passed {MAX_OUTPUT_BYTES} bytes")
                body = out.read_bytes()
        finally:
            self._profiling.discard(instance)
        if fmt == "svg":  # its title is py-spy's command line: the node's paths, the host pid
            ran = html.escape(" ".join([_py_spy(), *args]), quote=False).encode()
            body = body.replace(
                ran, f"osless debug profile {app} --instance {instance} --seconds {seconds}".encode()
            )
        return body


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def routes(profiler: Profiler, callers: Callers) -> list[Route]:
    """The routes, over the node agent's instances (`profiler.pids`)."""

    async def checked(request: Request) -> tuple[str, str] | Response:
        app, instance = request.path_params["app"], request.path_params["instance"]
        if not _APP.fullmatch(app):
            return _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        if not _INSTANCE.fullmatch(instance):
            return _error(400, "invalid_request", f"{instance[:100]!r} is not an instance id")
        refused = await callers.check(request, "sample", app)
        return refused if refused is not None else (app, instance)

    async def stack(request: Request) -> Response:
        found = await checked(request)
        if isinstance(found, Response):
            return found
        try:
            threads = await profiler.stack(*found)
        except LookupError as e:
            return _error(404, "instance_not_found", str(e))
        except Crowded as e:
            return _error(429, "too_many_sessions", str(e))
        except Failed as e:
            return _error(503, "debug_failed", str(e))
        return JSONResponse({"threads": threads})

    async def profile(request: Request) -> Response:
        found = await checked(request)
        if isinstance(found, Response):
            return found
        q = request.query_params
        seconds = q.get("seconds", "")
        fmt = q.get("format", "svg")
        if not (seconds.isascii() and seconds.isdigit() and 1 <= int(seconds) <= MAX_SECONDS):
            return _error(400, "invalid_request", f"seconds must be an integer from 1 to {MAX_SECONDS}")
        if fmt not in FORMATS:
            return _error(400, "invalid_request", f"format must be one of {', '.join(FORMATS)}")
        try:
            body = await profiler.profile(*found, int(seconds), fmt)
        except LookupError as e:
            return _error(404, "instance_not_found", str(e))
        except Busy as e:
            return _error(409, "profile_running", str(e))
        except Crowded as e:
            return _error(429, "too_many_sessions", str(e))
        except Failed as e:
            return _error(503, "debug_failed", str(e))
        media = "image/svg+xml" if fmt == "svg" else "application/json"
        return Response(body, media_type=media)

    return [
        Route("/debug/apps/{app}/instances/{instance}/stack", stack, methods=["POST"]),
        Route("/debug/apps/{app}/instances/{instance}/profile", profile, methods=["POST"]),
    ]
