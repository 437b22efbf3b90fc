"""One gateway process (`python -m osless.gateway`), as `osless up` starts one per core (`gateway.pool`).

It serves the HTTP port on a socket of its own, bound by `osless up` with `SO_REUSEPORT` and
passed in as a file descriptor: the kernel spreads the port's connections over the processes. It
has its own routing table, fed by the API's watches like any client's, and reports its traffic
under its own name (`<node>.gw-<k>`), so the API's sum over gateways stays the node's. It meets
the rest of the platform over HTTP only.

It runs under SCHED_BATCH (`_batch`): a gateway woken by a packet does not preempt the instance
running on that core, but waits its turn and then finds several events at once. With a process per
core besides the instances, each gateway has time to spare, and woken for each packet it preempted
an instance at nearly every answer (0.9 of them per answer), both halves of the hop then paying
for a wakeup a request: on 2 cores, 2 gateways and 2 instances answered 10.0k/s under SCHED_OTHER
and 14.9k/s under SCHED_BATCH, the gateways' CPU per answer 72 -> 43 us, the instances' 74 -> 55
(`benchmarks/throughput.py`). With a core to spare the kernel still places it on the idle core at
once: a lone request waits for nothing.

The node token comes on the control socket (an inherited descriptor), never in argv or the
environment, which other tools read and print; `ready` goes back on it once the routing table is
synced and the socket listens; then, each second, its request figures as one JSON line
(`gateway.metrics`), which the node sums over its processes for its `GET /metrics`. The process
dies with `osless up`: `PR_SET_PDEATHSIG`, and EOF on the control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket

from osless.client import AsyncApi
from osless.gateway.proxy import DEFAULT_TRACE_SAMPLE, Gateway
from osless.gateway.router import Router
from osless.pdeathsig import die_with_parent

__all__ = ["READY", "main", "serve"]

log = logging.getLogger("osless.gateway")

READY = b"ready\n"
MAX_TOKEN_BYTES = 4096
METRICS_EVERY_S = 1.0
SYNC_TIMEOUT_S = 30.0  # a routing table that cannot be read by then: exit, and `osless up` tries again


def _read_token(control: socket.socket) -> str:
    """The first line on the control socket: the token to act with (bounded; nothing else waits)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = control.recv(MAX_TOKEN_BYTES + 1 - len(data))
        if not chunk or len(data) + len(chunk) > MAX_TOKEN_BYTES:
            raise SystemExit("no token on the control socket")
        data += chunk
    return data.decode("ascii").strip()


async def _send_metrics(gateway: Gateway, router: Router, control: socket.socket) -> None:
    """The process's figures to its node, each second (`gateway.metrics`)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(METRICS_EVERY_S)
        in_flight = {app: t.in_flight for app, t in gateway.traffic.apps.items()}
        snap = gateway.metrics.snapshot(router.apps.items, in_flight, len(gateway.connections))
        await loop.sock_sendall(control, json.dumps(snap, separators=(",", ":")).encode() + b"\n")


async def serve(
    api_url: str,
    token: str,
    node: str,
    name: str,
    listeners: list[socket.socket],
    control: socket.socket,
    trace_sample: float = DEFAULT_TRACE_SAMPLE,
    metrics: bool = True,
) -> None:
    """Serve the port until SIGTERM or `osless up` goes (EOF on `control`); `metrics` False counts
    no requests for the node's /metrics."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    api = AsyncApi(api_url, token)
    router = Router(api, node=node, token=token)
    gateway = Gateway(router, api, name=name, trace_sample=trace_sample)
    gateway.metrics.enabled = metrics
    control.setblocking(False)
    tasks: list[asyncio.Task[object]] = []
    try:
        await router.start()
        try:
            await asyncio.wait_for(router.synced(), SYNC_TIMEOUT_S)
        except TimeoutError:
            raise SystemExit(f"{name}: could not read the routing table from {api_url}") from None
        # What start-up built lives as long as the process: out of the collector's way, so that a
        # collection triggered by requests does not walk it each time.
        gc.freeze()
        # Listening only now: until then the kernel gives this process's share to the others.
        await gateway.listen(listeners)
        await loop.sock_sendall(control, READY)
        tasks = [
            asyncio.create_task(stop.wait()),
            asyncio.create_task(loop.sock_recv(control, 1)),  # b"": osless up is gone
            asyncio.create_task(gateway.traffic.report(api, f"{node}.{name}")),
            asyncio.create_task(_send_metrics(gateway, router, control)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await gateway.aclose()
        await router.close()
        await api.aclose()


def _batch() -> None:
    """This process, and the threads it starts, under SCHED_BATCH (no privilege needed; the
    module's docstring says why). A kernel without it: the default policy, said once."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as e:
        log.warning("SCHED_BATCH refused (%s): the gateway runs under the default policy", e)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m osless.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--api", required=True, help="the API's URL")
    parser.add_argument("--node", required=True, help="the node's name")
    parser.add_argument(
        "--name", required=True, help="this process's, gw-<k>: its traffic is <node>.gw-<k>'s"
    )
    parser.add_argument(
        "--trace-sample", type=float, default=DEFAULT_TRACE_SAMPLE, help="traces recorded past 1/s"
    )
    parser.add_argument("--parent", type=int, required=True, help="the pid of osless up")
    parser.add_argument("--control-fd", type=int, required=True, help="the token in, ready out")
    parser.add_argument("--listen-fd", type=int, action="append", required=True, help="a bound socket")
    parser.add_argument("--no-metrics", action="store_true", help="count no requests for /metrics")
    args = parser.parse_args(argv)
    die_with_parent(args.parent, signal.SIGKILL)
    # Ctrl-C in a terminal reaches the whole process group: `osless up` decides, and says SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s %(levelname)s %(name)s[{args.name}]: %(message)s"
    )
    _batch()
    control = socket.socket(fileno=args.control_fd)
    token = _read_token(control)
    listeners = [socket.socket(fileno=fd) for fd in args.listen_fd]
    main_ = serve(
        args.api,
        token,
        args.node,
        args.name,
        listeners,
        control,
        trace_sample=args.trace_sample,
        metrics=not args.no_metrics,
    )
    try:
        import uvloop  # the faster loop, as `osless up` runs on
    except ImportError:
        asyncio.run(main_)
    else:
        uvloop.run(main_)
