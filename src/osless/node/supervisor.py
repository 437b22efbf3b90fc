"""One instance's life on a node: start, wait ready, watch it, restart with backoff, say why it ended."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osless.bounds import cap
from osless.logs import LogWriter
from osless.node.cgroups import Cgroups, InstanceCgroup, Limits
from osless.node.metrics import Meter
from osless.node.spawn import Child, ChildExited, ExitStatus, Zygote, ZygoteFailed
from osless.node.traces import SpanStore

__all__ = ["STOP_GRACE", "Supervisor", "exit_reason"]

log = logging.getLogger("osless.node")

READY_TIMEOUT = 30.0
DRAIN_S = 0.2  # time for the gateways to see an instance leave before it stops accepting
KEEP_LOGS = 50  # per app: the logs of instances long gone are deleted past this many
# After SIGTERM, before SIGKILL: when the node itself stops, and when an instance's handlers' timeouts
# are not known (a replaced instance gets `Supervisor.stop_grace_s`, from them).
STOP_GRACE = 5.0
# What an instance wrote last (its access lines, flushed as it exits) may still be in its pipes when
# its exit is known: its log waits this long at most for them to be read to their end before it
# closes (a child the app forked may hold them open longer).
READ_OUT_S = 1.0
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
HEALTHY_AFTER = 30.0  # running this long resets the backoff
# The health check, on the control socket: a stuck instance (its loop blocked, its egress gone) fails
# it this many times in a row, and is replaced.
HEALTH_EVERY_S, HEALTH_TIMEOUT_S, HEALTH_FAILURES = 5.0, 2.0, 3
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: instance\r\nConnection: close\r\n\r\n"


def exit_reason(status: ExitStatus, oom: bool = False) -> str:
    if oom:
        return "out of memory (killed by the kernel's OOM killer)"
    if status.signal is not None:
        try:
            name = signal.Signals(status.signal).name
        except ValueError:
            name = f"signal {status.signal}"
        return f"killed by {name}"
    return f"exited with code {status.code}"


@dataclass(eq=False)  # hashed by identity: kept in a set while retiring
class _Run:
    """One process of the instance: what it was forked with and what is left to clean up."""

    number: int
    sockets: list[Path] = field(default_factory=list)  # web, control
    cgroup: InstanceCgroup | None = None
    child: Child | None = None
    ended: Callable[[float], None] | None = None  # hears the run's CPU seconds as its group goes
    # Told to stop (SIGTERM) and finishing its requests: it closes its control socket at once, so a
    # health check would fail, and it is on its way out anyway: none is made.
    draining: bool = False

    def kill(self, sig: int) -> None:
        # Through the cgroup when there is one: it holds host pids, while a sandboxed instance's own
        # pid means nothing on the host until its `ready` message told us the real one.
        if self.cgroup is not None:
            targets = self.cgroup.pids()
        elif self.child is not None and self.child.pid_is_real:
            # Without cgroups: the instance leads its own process group, which holds what it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, sig)
            return
        else:
            targets = []
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def clean_up(self) -> bool:
        """Kill what the run left, remove its groups and sockets; whether it ran out of memory."""
        for path in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        group, self.cgroup = self.cgroup, None  # counted once: by `ended` now, no more as running
        if group is None:
            return False
        if self.ended is not None:
            self.ended(group.cpu_seconds())
        oom = group.oom_kills() > 0
        await asyncio.to_thread(group.kill_all)  # whatever the instance started ends with it
        group.remove()
        return oom


class Supervisor:
    """Keeps one instance running until `stop()`; reports each change through `report`.

    An instance that asks to be replaced (a function ran past its deadline) or fails its health
    check is replaced at once: the next run starts while the old one stops, gracefully when it
    asked, by SIGKILL when it is stuck.
    """

    def __init__(
        self,
        instance: dict[str, Any],
        *,
        zygote: Callable[[], Awaitable[Zygote]],
        run_dir: Path,
        log_dir: Path,
        report: Callable[[str, dict[str, Any]], Awaitable[None]],
        cgroups: Cgroups | None = None,
        limits: Limits | None = None,
        uid: int | None = None,
        traces: SpanStore | None = None,
        meter: Meter | None = None,
        stop_grace_s: float = STOP_GRACE,
    ) -> None:
        """`run_dir`: a folder of the node's own (no app sees it) for the instance's sockets;
        `uid`: the host uid the instance runs as, reported so the gateway can check it; `meter`
        hears each start's time and each run's CPU time (the node's /metrics); `stop_grace_s`: how
        long a stop waits after SIGTERM before SIGKILL (its requests in flight finish meanwhile)."""
        self.stop_grace_s = stop_grace_s
        self.id: str = instance["id"]
        self.app: str = instance["app"]
        self.release: int = instance["release"]
        self.made_for_restart: int = int(instance.get("restart") or 0)  # the app's `restart` then
        self.image: str = instance["image"]
        status = instance.get("status") or {}
        self.status: dict[str, Any] = {
            "phase": "pending",
            "pid": None,
            "uid": uid if uid is not None else os.getuid(),
            "socket": None,
            "control": None,
            "restarts": int(status.get("restarts", 0)),
            "last_exit": status.get("last_exit"),
            "message": None,
        }
        self._zygote = zygote
        self._traces = traces
        self._cgroups = cgroups
        self.limits = limits or Limits()
        self._report = report
        self._meter = meter
        # Short: unix socket paths are capped at 108 bytes. A new pair each run (see `_bind`), and
        # names no earlier agent used: a record left from before a restart never names a new socket.
        self._sock_base = run_dir / (hashlib.sha256(self.id.encode()).hexdigest()[:12] + secrets.token_hex(3))
        self._runs = 0
        self._current: _Run | None = None
        # A debug session is attached (`node.attach`): no health checks meanwhile, since a breakpoint
        # stops every thread of the instance, its loop too.
        self.debugging = False
        self._retiring: set[asyncio.Task[None]] = set()
        self._read_out: set[asyncio.Future[None]] = set()  # its instances' pipes not yet at their end
        self._retired: set[_Run] = set()
        self.log = LogWriter(log_dir / f"{self.id}.log", source=self.id, keep_files=KEEP_LOGS)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restarting = False
        self._ready = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._unreported = False

    def start(self) -> None:
        # Platform events (stream "osless") in the instance's log: where it came from and went.
        self.log.write(f"instance placed on this node (release {self.release}): starting", "osless")
        self._task = asyncio.create_task(self._run(), name=f"instance {self.id}")

    def _set_soon(self, **changes: Any) -> asyncio.Task[None]:
        """Change the status and have it reported, in order, without waiting for the API: each
        report carries the whole status, so of several pending only the newest is sent."""
        self.status.update(changes)
        self._unreported = True
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.create_task(self._send_reports())
        return self._reporter

    async def _send_reports(self) -> None:
        while self._unreported:
            self._unreported = False
            await self._report(self.id, dict(self.status))

    async def _set(self, **changes: Any) -> None:
        """`_set_soon`, back once the API has it."""
        await asyncio.shield(self._set_soon(**changes))

    async def _run(self) -> None:
        backoff = BACKOFF_START
        while not self._stopping.is_set():
            started = time.monotonic()
            status, replaced = await self._run_once()
            if self._stopping.is_set():
                break
            if replaced or self._restarting:  # asked for (a config change, a replacement): no backoff
                self._restarting = False
                continue
            if time.monotonic() - started > HEALTHY_AFTER:
                backoff = BACKOFF_START
            self.status["restarts"] += 1
            await self._set(phase="backoff", pid=None, message=f"restarting in {backoff:.1f}s")
            self.log.write(f"instance stopped ({status}); restarting in {backoff:.1f}s", "osless")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _run_once(self) -> tuple[str, bool]:
        """One run: (why it ended, whether it was replaced rather than ended)."""
        # Not waited for: a start from zero is on a request's path, and the fork needs nothing of it.
        self._set_soon(phase="starting", message=None)
        forked = time.monotonic()
        self._runs += 1
        began = time.monotonic()
        run = _Run(self._runs)
        if self._meter is not None:
            run.ended = functools.partial(self._meter.ended, self.app)
        try:
            zyg = await self._zygote()
            sockets = self._bind(run)
            env = {"OSLESS_APP": self.app, "OSLESS_INSTANCE": self.id, "OSLESS_RELEASE": str(self.release)}
            run.cgroup = self._new_cgroup()
            procs = run.cgroup.open_join_files() if run.cgroup else []
            try:
                # A new id each run: a late message about an earlier run cannot be taken for this one.
                spans = functools.partial(self._traces.add, self.app, self.id) if self._traces else None
                run.child = await zyg.fork(f"{self.id}.{run.number}", sockets, env, self.log, procs, spans)
                for reading in run.child.read_out:
                    self._read_out.add(reading)
                    reading.add_done_callback(self._read_out.discard)
            finally:
                for fd in procs:
                    os.close(fd)
                for sock in sockets:
                    sock.close()  # the instance has its own copies
        except (ZygoteFailed, TimeoutError, OSError) as e:
            await run.clean_up()
            reason = cap(f"the app failed to load: {e}")  # the app's own error: stored, so capped
            await self._set(last_exit={"code": None, "signal": None, "reason": reason, "at": time.time()})
            self.log.write(reason, "osless")
            return reason, False
        child = run.child
        self._current = run
        if self._stopping.is_set():  # stop() came while we were forking
            run.kill(signal.SIGTERM)
        watch: asyncio.Task[tuple[str, bool]] | None = None
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), READY_TIMEOUT)
            web, control = run.sockets
            if self._meter is not None:
                self._meter.started(self.app, time.monotonic() - began)
            await self._set(phase="ready", pid=child.pid, socket=str(web), control=str(control))
            self._ready.set()
            self.log.write(f"instance ready in {(time.monotonic() - forked) * 1000:.0f}ms", "osless")
            watch = asyncio.create_task(self._watch(run))
            either: list[asyncio.Future[Any]] = [watch, child.exited]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except ChildExited:
            pass
        except TimeoutError:
            self.log.write(f"not ready within {READY_TIMEOUT:.0f}s; killing it", "osless")
            run.kill(signal.SIGKILL)
        if watch is not None and watch.done() and not child.exited.done() and not self._stopping.is_set():
            reason, graceful = watch.result()
            self._replace(run, reason, graceful)
            return reason, True
        if watch is not None:
            watch.cancel()
        exited = await child.exited
        self._ready.clear()
        self._current = None
        oom = await run.clean_up()
        reason = exit_reason(exited, oom)
        if not self._stopping.is_set():
            await self._set(
                last_exit={"code": exited.code, "signal": exited.signal, "reason": reason, "at": time.time()},
                phase="backoff",
                pid=None,
            )
            self.log.write(f"instance {reason}", "osless")
        else:
            self.log.write(f"instance stopped ({reason})", "osless")
        return reason, False

    async def _watch(self, run: _Run) -> tuple[str, bool]:
        """Until the instance asks to be replaced or fails its health check HEALTH_FAILURES times
        in a row: (why, whether to let it stop gracefully)."""
        assert run.child is not None
        failures = 0
        ooms = 0
        while True:
            # Spread out: instances started together are not all asked in the same instant.
            every = HEALTH_EVERY_S * random.uniform(0.8, 1.2)
            if run.draining:  # neither its health nor its asking to be replaced matters now
                await asyncio.sleep(every)
                continue
            done, _ = await asyncio.wait([run.child.recycle], timeout=every)
            if done and not run.draining:
                return run.child.recycle.result(), True
            if self.debugging or run.draining:
                failures = 0
                continue
            problem = await _health_problem(run.sockets[1])
            if run.draining:  # told to stop while it was asked: the refusal is its drain
                failures = 0
                continue
            # A process of the instance (a subprocess, a worker) the OOM killer took while the
            # instance lives on: said in its log, as an instance killed is when it exits.
            kills = run.cgroup.oom_kills() if run.cgroup is not None else 0
            if kills > ooms:
                ooms = kills
                self.log.write(
                    f"out of memory: the kernel's OOM killer killed a process of the instance "
                    f"({kills} so far in this run; its limit is {self.limits.memory_mb} MB)",
                    "osless",
                )
            failures = failures + 1 if problem else 0
            if problem:
                self.log.write(f"health check failed ({failures} of {HEALTH_FAILURES}): {problem}", "osless")
            if failures >= HEALTH_FAILURES:
                return f"unhealthy: {problem}", False

    def _replace(self, run: _Run, reason: str, graceful: bool) -> None:
        """Take the run out of rotation, start retiring it, and let `_run` start the next one now."""
        self._ready.clear()
        self._current = None
        self.status["restarts"] += 1
        self._set_soon(phase="starting", pid=None, message=f"replaced: {reason}")
        self.log.write(f"replacing the instance: {reason}", "osless")
        self._retired.add(run)
        task = asyncio.create_task(self._retire(run, reason, graceful))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, run: _Run, reason: str, graceful: bool) -> None:
        assert run.child is not None
        try:
            if graceful:
                await asyncio.sleep(DRAIN_S)  # the gateways see it leave before it stops accepting
            run.kill(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(run.child.exited), self.stop_grace_s if graceful else 5)
            except TimeoutError:
                run.kill(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run.child.exited), 5)
        finally:
            await run.clean_up()
            self._retired.discard(run)
        exited = run.child.exited.result() if run.child.exited.done() else None
        if exited is not None and not self._stopping.is_set():
            self._set_soon(
                last_exit={
                    "code": exited.code,
                    "signal": exited.signal,
                    "reason": f"replaced ({reason}); {exit_reason(exited)}",
                    "at": time.time(),
                }
            )

    def _bind(self, run: _Run) -> tuple[socket.socket, socket.socket]:
        """The run's web and control sockets, bound here, by the node, in its own folder: the
        instance only listens on them, so no app can bind, replace or even see them. Named anew each
        run, so a socket path in the routing table always means one run of the instance."""
        bound: list[socket.socket] = []
        try:
            for kind in ("web", "ctl"):
                path = Path(f"{self._sock_base}.{run.number}.{kind}")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                bound.append(sock)
                sock.bind(str(path))
                run.sockets.append(path)
        except OSError:
            for sock in bound:
                sock.close()
            raise
        return bound[0], bound[1]

    def _new_cgroup(self) -> InstanceCgroup | None:
        """Fresh groups per run, so the OOM counter speaks of this run only. Where this node has
        cgroups, an instance never runs without its limits: a failure to set them fails the run."""
        if self._cgroups is None:
            return None
        try:
            return self._cgroups.create(self.limits)
        except OSError as e:
            raise OSError(f"its resource limits ({self.limits}) could not be applied: {e}") from e

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, memory bytes) of the instance's runs now, from their groups (0 without)."""
        cpu, memory = 0.0, 0
        for run in [self._current, *self._retired]:
            if run is not None and run.cgroup is not None:
                cpu += run.cgroup.cpu_seconds()
                memory += run.cgroup.memory_bytes()
        return cpu, memory

    def _kill(self, sig: int) -> None:
        if self._current is not None:
            self._current.kill(sig)

    async def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Replace the running instance with a new one (from the zygote of now); back once it is ready,
        or once `timeout` has passed after the old one ended."""
        run = self._current
        if run is None or run.child is None:
            return
        self._restarting = True
        self._ready.clear()
        run.draining = True
        # Out of the gateway's rotation first, then a graceful stop: requests in flight finish, within
        # the instance's grace.
        await self._set(phase="stopping")
        await asyncio.sleep(DRAIN_S)
        if not run.child.exited.done():  # its pid may be another process's once it has ended
            run.kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(run.child.exited), self.stop_grace_s)
        except TimeoutError:
            run.kill(signal.SIGKILL)  # it would not stop: forced, rather than left out of rotation
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)

    @contextlib.asynccontextmanager
    async def debug_session(self, leave_rotation: bool) -> AsyncIterator[None]:
        """While a debugger is attached: no health checks and, if `leave_rotation`, out of the
        gateway's rotation (phase `debugging`). After it, the instance is replaced by a fresh one:
        a debugger may have changed anything in it, and its debugpy would listen on."""
        pid = self.status.get("pid")
        self.debugging = True
        self.log.write("a debugger is attached: no health checks until it goes", "osless")
        try:
            if leave_rotation:
                await self._set(phase="debugging", message="a debugger is attached: out of rotation")
            yield
        finally:
            self.debugging = False
            if self.status.get("pid") == pid and not self._stopping.is_set():
                self.log.write("debug session ended: replacing the instance", "osless")
                await self.restart()

    async def stop(self, why: str | None = None, *, node_stopping: bool = False) -> None:
        """SIGTERM, then SIGKILL after the grace period; returns once the task has ended. `why`: for
        the log. An instance taken off the node (a deploy, a restart, a scale-down) gets its own
        grace, `stop_grace_s`, so that no request within its time is cut; when the node itself stops
        (`node_stopping`), STOP_GRACE. May be called again, with `node_stopping`, to shorten a stop."""
        grace = STOP_GRACE if node_stopping else self.stop_grace_s
        if why is not None and not self._stopping.is_set():
            self.log.write(f"instance stopping: {why}", "osless")
        again = self._stopping.is_set()
        self._stopping.set()
        current = self._current
        if current is not None:
            current.draining = True
            if not node_stopping and not again and self._ready.is_set():
                # Its record is deleted already: the gateways see it leave before it stops accepting
                # (a kept-alive connection it closes as a request goes out on it would fail that one).
                await asyncio.sleep(DRAIN_S)
        self._kill(signal.SIGTERM)
        for run in list(self._retired):
            run.kill(signal.SIGTERM)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._kill(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._task, 2)
        for run in list(self._retired):
            run.kill(signal.SIGKILL)
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=STOP_GRACE)
        if self._read_out:
            await asyncio.wait(list(self._read_out), timeout=READ_OUT_S)
        self.log.close()


async def _health_problem(control: Path) -> str | None:
    """What is wrong with the instance, asked on its control socket; None when it is healthy."""
    # A bare socket on the loop rather than streams: the node asks every instance, all the time.
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    answer = b""
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            try:
                await loop.sock_connect(sock, str(control))
            except OSError as e:
                return f"its control socket refused the connection: {e}"
            await loop.sock_sendall(sock, HEALTH_REQUEST)
            while len(answer) < 16384:  # the instance is the app's: read a bounded answer
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        return f"no answer within {HEALTH_TIMEOUT_S:g}s (its event loop may be blocked)"
    except OSError as e:
        return f"the health check broke off: {e}"
    finally:
        sock.close()
    if answer.startswith(b"HTTP/1.1 200 "):
        return None
    status = answer.split(b"\r\n", 1)[0].decode("latin-1")[:100] or "nothing"
    body = answer.partition(b"\r\n\r\n")[2]
    try:
        problem = json.loads(body).get("problem")
    except (ValueError, AttributeError):
        problem = None
    return str(problem)[:300] if problem else f"it answered {status!r}"
