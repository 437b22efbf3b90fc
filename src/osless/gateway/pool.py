"""A node's gateway processes: the HTTP port shared by N of them, each started again when it dies.

One Python process stops at one core; N processes (`osless up --gateways N`, one per core by
default) each serve their share of the port's connections (`gateway.process`). The sockets are
bound here, in `osless up`, so a taken port is its error and nobody else's: first without
`SO_REUSEPORT`, which fails when anything listens there (another `osless up` too, which would
otherwise join the group and take half the connections); then a bound socket is kept, not
listening, that holds the port for this process's uid while the gateway processes come and go.
Each process gets a fresh socket of its own, with `SO_REUSEPORT`, and is its only holder: when it
dies its socket goes with it and the kernel gives the others its connections; its replacement
listens only once its routing table is read.

What the processes do not share, each keeps for itself, and it stays right: the traffic figures
(process `gw-<k>` reports under `<node>.gw-<k>`, and the API sums them), the cache of tokens, and
the activator's wake calls (at most one at a time per app and process). An app's
`concurrency_limit` holds per process: see docs/architecture.md, "Following traffic".

Request figures for the node's `GET /metrics` are summed here: each process sends its own since
it started, each second, on its control socket (`gateway.metrics`); what a process that died had
counted is kept (`retired`), so the node's counters only grow while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from osless.gateway.metrics import Figures
from osless.gateway.process import READY
from osless.gateway.proxy import DEFAULT_TRACE_SAMPLE

__all__ = ["GatewayPool", "default_count"]

log = logging.getLogger("osless.gateway")

READY_TIMEOUT_S = 60.0  # the process itself gives up on the API after 30 s
STOP_GRACE_S = 5.0
BACKOFF_S = (0.1, 10.0)  # first restart, and the longest wait between restarts
STEADY_S = 10.0  # a process that lived this long before it died starts again at once
MAX_METRICS_LINE = 16 * 1024 * 1024  # one process's snapshot: apps x functions x a few dozen numbers


def default_count() -> int:
    """One gateway process per core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def _addresses(host: str, port: int) -> list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]]:
    """(family, sockaddr) of each address `host` names, as asyncio's own servers bind them."""
    found: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]] = []
    for family, _, _, _, addr in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        if family in (socket.AF_INET, socket.AF_INET6) and (family, addr) not in found:
            found.append((family, addr))  # type: ignore[arg-type]
    return found


def _bind(
    family: int, addr: tuple[str, int] | tuple[str, int, int, int], *, reuse_addr: bool, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_addr:  # a restart binds over connections still in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    """One gateway process's place: its name, and the process now in it, if any."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    ready: asyncio.Future[None] | None = None  # its first start's outcome
    restarts: int = 0
    metrics: dict[str, Any] | None = None  # the newest snapshot of the process now in it

    def started(self, error: str | None = None) -> None:
        if self.ready is not None and not self.ready.done():
            if error is None:
                self.ready.set_result(None)
            else:
                self.ready.set_exception(RuntimeError(error))


class GatewayPool:
    """`count` gateway processes on `host:port`, fed by the API at `api_url` with `token`."""

    def __init__(
        self,
        *,
        api_url: str,
        token: str,
        node: str,
        host: str,
        port: int,
        count: int,
        trace_sample: float = DEFAULT_TRACE_SAMPLE,
        metrics: bool = True,
    ) -> None:
        """`metrics` False: the processes count no requests (`--no-gateway-metrics`)."""
        self.metrics = metrics
        self.retired = Figures()  # what processes that died had counted
        self.api_url = api_url
        self.trace_sample = trace_sample
        self.token = token  # what its processes act with: a gateway token, set before `start`
        self.host = host
        self.port = port
        self.node = node
        self.slots = [_Slot(f"gw-{k}") for k in range(1, count + 1)]
        self._addresses: list[tuple[int, tuple[str, int] | tuple[str, int, int, int]]] = []
        self._holds: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def reserve(self) -> None:
        """Take the port for this `osless up`; OSError if anything else has it."""
        self._addresses = _addresses(self.host, self.port)
        if not self._addresses:
            raise OSError(f"{self.host!r} names no IPv4 or IPv6 address")
        for family, addr in self._addresses:
            _bind(family, addr, reuse_addr=True, reuse_port=False).close()
        self._holds = [_bind(f, a, reuse_addr=False, reuse_port=True) for f, a in self._addresses]

    async def start(self) -> None:
        """Start every process and return once all listen; RuntimeError if one cannot."""
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        for slot in self.slots:
            slot.ready = loop.create_future()
            waiting.append(slot.ready)
        self._tasks = [asyncio.create_task(self._keep(slot), name=slot.name) for slot in self.slots]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
        for ready in waiting:
            if ready.done() and ready.exception() is not None:
                raise ready.exception()  # type: ignore[misc]

    async def run(self) -> None:
        """Keep the processes up (started again with backoff when they die) until cancelled."""
        await asyncio.gather(*self._tasks)

    async def _keep(self, slot: _Slot) -> None:
        delay = BACKOFF_S[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                how = await self._run_once(slot)
            except Exception as e:  # a bug, or the host out of something (fds): tried again all the same
                log.exception("gateway process %s: starting it failed", slot.name)
                slot.started(f"gateway process {slot.name} could not be started: {e!r}")
                how = f"could not be started ({e!r})"
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STEADY_S:
                delay = BACKOFF_S[0]
            slot.restarts += 1
            # Loud: the port still answers (the others take its connections), but something is wrong.
            log.error(
                "GATEWAY PROCESS %s %s; starting it again in %.1fs (restart %d)",
                slot.name,
                how,
                delay,
                slot.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _run_once(self, slot: _Slot) -> str:
        """Start the slot's process and wait for it to end; how it ended, in words."""
        try:
            listeners = [_bind(f, a, reuse_addr=True, reuse_port=True) for f, a in self._addresses]
        except OSError as e:
            slot.started(f"cannot bind the port for gateway process {slot.name}: {e}")
            return f"could not bind the port ({e})"
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "osless.gateway",
                    "--api",
                    self.api_url,
                    "--node",
                    self.node,
                    "--name",
                    slot.name,
                    "--trace-sample",
                    repr(self.trace_sample),
                    "--parent",
                    str(os.getpid()),
                    "--control-fd",
                    str(theirs.fileno()),
                    *(() if self.metrics else ("--no-metrics",)),
                    *(arg for s in listeners for arg in ("--listen-fd", str(s.fileno()))),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), *(s.fileno() for s in listeners)],
                # None of the platform's own settings: the admin's token or the secrets' key may be
                # among them, and a gateway needs neither.
                env={k: v for k, v in os.environ.items() if not k.startswith("OSLESS_")},
            )
        except OSError as e:
            ours.close()
            slot.started(f"cannot start gateway process {slot.name}: {e}")
            return f"could not be started ({e})"
        finally:
            theirs.close()
            for s in listeners:
                s.close()  # the process holds them now: when it dies, its share goes to the others
        slot.proc = proc
        ended = _exit_of(proc)
        try:
            ours.sendall(self.token.encode("ascii") + b"\n")
            ours.setblocking(False)
            reply = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(ours, len(READY)))
            either: list[asyncio.Future[Any]] = [reply, ended]
            await asyncio.wait(either, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not (reply.done() and not reply.exception() and reply.result() == READY):
                reply.cancel()
                if not ended.done():  # no word in all that time: stuck
                    proc.kill()
                how = f"(pid {proc.pid}) {_ended(await ended)} before it was ready"
                slot.started(f"gateway process {slot.name} {how} (see above)")
                return how
            slot.started()
            # `ours` stays open while the process lives: its EOF tells the process osless up is gone.
            reading = asyncio.ensure_future(self._read_metrics(slot, ours))
            try:
                return f"(pid {proc.pid}) {_ended(await ended)}"
            finally:
                reading.cancel()
        finally:
            if slot.metrics is not None:
                self.retired.add(slot.metrics, counters_only=True)
                slot.metrics = None
            if proc.returncode is None:  # cancelled: osless up is stopping
                proc.kill()
                await asyncio.shield(ended)
            ours.close()
            slot.proc = None

    async def _read_metrics(self, slot: _Slot, ours: socket.socket) -> None:
        """Keep the newest of the process's snapshots, one JSON line each second."""
        loop = asyncio.get_running_loop()
        buf = b""
        while chunk := await loop.sock_recv(ours, 1 << 16):
            buf += chunk
            if b"\n" not in buf:
                if len(buf) > MAX_METRICS_LINE:
                    log.warning(
                        "gateway process %s: a metrics line past %d bytes, dropped", slot.name, len(buf)
                    )
                    buf = b""
                continue
            *lines, buf = buf.split(b"\n")
            try:
                found = json.loads(lines[-1])
            except ValueError:
                continue
            if isinstance(found, dict):
                slot.metrics = found

    def figures(self) -> Figures:
        """The processes' request figures summed, and those of processes that died."""
        out = Figures()
        live = [slot.metrics for slot in self.slots if slot.metrics is not None]
        deployed: set[str] = set()
        for snap in live:
            deployed.update(snap.get("apps", ()))
        if live:
            self.retired.forget(deployed)
        out.add(
            {"series": [[a, f, s.codes, s.buckets, s.total] for (a, f), s in self.retired.series.items()]}
        )
        for snap in live:
            out.add(snap)
        return out

    async def stop(self) -> None:
        """SIGTERM to each process, SIGKILL to any still there after the grace period."""
        self._stopping.set()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.terminate()
        # Each slot's task returns once its process ends; after the grace, cancelled, it kills it.
        _, late = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S) if self._tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hold in self._holds:
            hold.close()
        self._holds = []


def _exit_of(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """Resolved with `proc`'s exit status when it ends: a pidfd on the loop, no thread, no polling."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # a kernel older than 5.3: a thread waits instead
        return asyncio.ensure_future(asyncio.to_thread(proc.wait))
    done: asyncio.Future[int] = loop.create_future()

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = proc.wait()  # it has ended: reaped at once
        if not done.done():
            done.set_result(code)

    loop.add_reader(pidfd, on_exit)
    return done


def _ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
