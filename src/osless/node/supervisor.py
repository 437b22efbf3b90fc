"""One instance's life on a node: start, wait ready, watch it, restart with backoff, say why it ended."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from osless.bounds import cap
from osless.logs import LogWriter
from osless.node.cgroups import Cgroups, InstanceCgroup, Limits
from osless.node.spawn import Child, ChildExited, ExitStatus, Zygote, ZygoteFailed

__all__ = ["Supervisor", "exit_reason"]

log = logging.getLogger("osless.node")

READY_TIMEOUT = 30.0
DRAIN_S = 0.2  # time for the gateways to see an instance leave before it stops accepting
KEEP_LOGS = 50  # per app: the logs of instances long gone are deleted past this many
STOP_GRACE = 5.0
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
HEALTHY_AFTER = 30.0  # running this long resets the backoff


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


class Supervisor:
    """Keeps one instance running until `stop()`; reports each change through `report`."""

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
        sock_dir: Path | None = None,
    ) -> None:
        self.id: str = instance["id"]
        self.app: str = instance["app"]
        self.release: int = instance["release"]
        self.image: str = instance["image"]
        status = instance.get("status") or {}
        self.status: dict[str, Any] = {
            "phase": "pending",
            "pid": None,
            "socket": None,
            "restarts": int(status.get("restarts", 0)),
            "last_exit": status.get("last_exit"),
            "message": None,
        }
        self._zygote = zygote
        self._cgroups = cgroups
        self.limits = limits or Limits()
        self._cgroup: InstanceCgroup | None = None
        self._child: Child | None = None
        self._report = report
        name = hashlib.sha256(self.id.encode()).hexdigest()[:16]
        self.sock_path = (
            sock_dir or run_dir
        ) / f"{name}.sock"  # short: unix socket paths are capped at 108 bytes
        self.log = LogWriter(log_dir / f"{self.id}.log", source=self.id, keep_files=KEEP_LOGS)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restarting = False
        self._ready = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._unreported = False

    def start(self) -> None:
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
            status = await self._run_once()
            if self._stopping.is_set():
                break
            if self._restarting:  # asked for (a config change): no backoff, not a crash
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

    async def _run_once(self) -> str:
        # Not waited for: a start from zero is on a request's path, and the fork needs nothing of it.
        self._set_soon(phase="starting", message=None)
        cgroup: InstanceCgroup | None = None
        try:
            zyg = await self._zygote()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
            env = {"OSLESS_APP": self.app, "OSLESS_INSTANCE": self.id, "OSLESS_RELEASE": str(self.release)}
            cgroup = self._new_cgroup()
            procs = cgroup.open_join_files() if cgroup else []
            try:
                # A new id each run: a late message about an earlier run cannot be taken for this one.
                run_id = f"{self.id}.{self.status['restarts']}"
                child = await zyg.fork(run_id, self.sock_path, env, self.log, procs)
            finally:
                for fd in procs:
                    os.close(fd)
        except (ZygoteFailed, TimeoutError, OSError) as e:
            if cgroup is not None:
                cgroup.remove()
            reason = cap(f"the app failed to load: {e}")  # the app's own error: stored, so capped
            await self._set(last_exit={"code": None, "signal": None, "reason": reason, "at": time.time()})
            self.log.write(reason, "osless")
            return reason
        self._cgroup = cgroup
        self._child = child
        if self._stopping.is_set():  # stop() came while we were forking
            self._kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), READY_TIMEOUT)
            await self._set(phase="ready", pid=child.pid, socket=str(self.sock_path))
            self._ready.set()
        except ChildExited:
            pass
        except TimeoutError:
            self.log.write(f"not ready within {READY_TIMEOUT:.0f}s; killing it", "osless")
            self._kill(signal.SIGKILL)
        exited = await child.exited
        self._ready.clear()
        self._child = None
        oom = False
        if cgroup is not None:
            oom = cgroup.oom_kills() > 0
            await asyncio.to_thread(cgroup.kill_all)  # whatever the instance started ends with it
            cgroup.remove()
            self._cgroup = None
        reason = exit_reason(exited, oom)
        if not self._stopping.is_set():
            await self._set(
                last_exit={"code": exited.code, "signal": exited.signal, "reason": reason, "at": time.time()},
                phase="backoff",
                pid=None,
            )
            self.log.write(f"instance {reason}", "osless")
        return reason

    def _new_cgroup(self) -> InstanceCgroup | None:
        """Fresh groups per run, so the OOM counter speaks of this run only."""
        if self._cgroups is None:
            return None
        try:
            return self._cgroups.create(self.limits)
        except OSError as e:
            self.log.write(f"resource limits not applied: {e}", "osless")
            return None

    def _kill(self, sig: int) -> None:
        # Through the cgroup when there is one: it holds host pids, while a sandboxed instance's own
        # pid means nothing on the host until its `ready` message told us the real one.
        if self._cgroup is not None:
            targets = self._cgroup.pids()
        elif self._child is not None and self._child.pid_is_real:
            # Without cgroups: the instance leads its own process group, which holds what it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._child.pid, sig)
            return
        else:
            targets = []
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Replace the running instance with a new one (from the zygote of now); back once it is ready."""
        if self._child is None:
            return
        self._restarting = True
        self._ready.clear()
        # Out of the gateway's rotation first, then a graceful stop: requests in flight finish.
        await self._set(phase="stopping")
        await asyncio.sleep(DRAIN_S)
        self._kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            # It would not stop (or not come back): force it, rather than leave it out of rotation.
            self._kill(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; returns once the task has ended."""
        self._stopping.set()
        self._kill(signal.SIGTERM)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE)
            except TimeoutError:
                self._kill(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._task, 2)
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
