"""A node: the machine's node agent, its gateway processes and its relay (how other nodes' gateways
reach its instances), reaching the API over HTTP only.

`osless up` runs one in its own loop, next to the API; `osless node join --api URL --token T` runs one
alone, on any machine that can reach the API. The node's own folder (its logs, its sandboxes' run
dir, its volumes) is its data dir: never the API's, even when both are on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from osless.client import ApiError, AsyncApi
from osless.gateway.pool import GatewayPool, default_count
from osless.gateway.proxy import DEFAULT_TRACE_SAMPLE
from osless.node import NodeAgent, attach, debug, doctor
from osless.node.api import NodeApi
from osless.node.appmetrics import scrape_app
from osless.node.doctor import Protection
from osless.node.egress_rules import Network
from osless.node.metrics import NodeCollector, render
from osless.node.relay import Relay, supervised
from osless.node.runs import NodeRuns
from osless.node.usage import Sampler

__all__ = ["NodeConfig", "NodeHost", "default_node_name", "host_protections", "private_dir", "run_node"]

log = logging.getLogger("osless")


def default_node_name() -> str:
    """The host name, made fit for a node name (lowercase letters, digits, '.' and '-')."""
    return re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")[:80] or "node"


def private_dir(path: Path) -> None:
    """Nothing the platform writes is for other local users: the umask covers every file and folder
    made from here on (sandboxes set their own, for the roots they build), and the folder itself is
    made 0700."""
    os.umask(0o077)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def host_protections(
    sandbox: bool, what: str = "APPS RUN WITHOUT A SANDBOX, their builds included"
) -> tuple[bool, list[Protection]]:
    """Whether apps (and builds) run sandboxed here, and what the host gives; what is missing is
    said loudly (`what`: who runs without), never silently."""
    protections = doctor.check()
    missing = {p.name: p.detail for p in protections if not p.ok}
    for name, detail in missing.items():
        log.warning("PROTECTION MISSING on this host: %s (%s)", name, detail)
    sandboxed = sandbox and not any(name in missing for name in doctor.REQUIRED)
    if not sandboxed:
        log.warning(
            "%s: %s",
            what,
            "turned off by --no-sandbox"
            if not sandbox
            else "this host lacks " + ", ".join(n for n in doctor.REQUIRED if n in missing),
        )
    return sandboxed, protections


@dataclass
class NodeConfig:
    api_url: str
    token: str  # a node token: `osless tokens create --role node --name NAME`
    data_dir: Path
    name: str = field(default_factory=default_node_name)
    host: str = "127.0.0.1"  # where this node's gateway listens, and where other parts reach it
    http_port: int = 8080
    node_api_port: int = 0  # the node API (the logs of its instances); 0: a free port
    gateways: int = field(default_factory=default_count)  # gateway processes sharing http_port
    trace_sample: float = DEFAULT_TRACE_SAMPLE  # of the traces a gateway starts, past the first each second
    sandbox: bool = True
    # Internal ranges apps may reach when they list them (`--egress-allow`).
    egress_allow: list[Network] = field(default_factory=list)
    relay_port: int = 0  # where other nodes' gateways reach this node's instances (0: a free port)
    gateway_metrics: bool = True  # the gateways count requests for /metrics (`--no-gateway-metrics`)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


def source_address(host: str) -> str | None:
    """The address a node's connections to the API come from: its own `--host`, unless that is a
    wildcard (listening everywhere: the system picks, and the API takes it as the node's address)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # A name could resolve anywhere, later: the API takes URLs on the node's own address only.
        raise SystemExit(
            f"--host {host[:100]!r} is not an IP address: give this node's address (e.g. 10.0.0.5), "
            "where others reach it and from which it reaches the API"
        ) from None
    return None if ip.is_unspecified else str(ip)


class NodeHost:
    """The node's parts, started in order: the gateway's and the node API's ports reserved, the
    gateway processes up (they read their routing table first), the node API, then the agent (whose
    heartbeat says where the node API is)."""

    def __init__(self, cfg: NodeConfig, *, sandboxed: bool, protections: list[Protection]) -> None:
        self.cfg = cfg
        # The parts act as this node, from its address: the API holds the URLs it reports to that.
        self.api = AsyncApi(cfg.api_url, cfg.token, local_address=source_address(cfg.host))
        self.gateways = GatewayPool(
            api_url=cfg.api_url,
            token="",  # its own gateway token, asked for at `start`: never the node's, which reads secrets
            node=cfg.name,
            host=cfg.host,
            port=cfg.http_port,
            count=cfg.gateways,
            trace_sample=cfg.trace_sample,
            metrics=cfg.gateway_metrics,
        )
        self.agent = NodeAgent(
            self.api,
            name=cfg.name,
            data_dir=cfg.data_dir,
            gateway=(cfg.host, cfg.http_port),
            sandbox=sandboxed,
            protections=protections,
            egress_allow=cfg.egress_allow,
        )
        self.relay = Relay(cfg.api_url, supervised(self.agent.supervisors), node=cfg.name)
        self.node_api = NodeApi(
            api_url=cfg.api_url,
            logs_dir=self.agent.logs_dir,
            host=cfg.host,
            port=cfg.node_api_port,
            node=cfg.name,
            volumes=self.agent.volumes,
            runs=NodeRuns(self.agent).serve,
            profiler=debug.Profiler(debug.supervised_pids(self.agent.supervisors)),
            traces=self.agent.traces,
            metrics=functools.partial(
                render, NodeCollector(self.gateways, self.agent.supervisors, self.agent.meter, cfg.name)
            ),
            app_metrics=functools.partial(scrape_app, supervisors=self.agent.supervisors),
            attacher=attach.Attacher(self.agent.supervisors),
        )

        self.sampler = Sampler(self.api, cfg.name, self.gateways, self.agent.supervisors, self.agent.meter)

    def reserve(self) -> None:
        """Hold the gateway's and the node API's ports now: a taken port is this node's error, said
        before anything runs."""
        try:
            self.gateways.reserve()
        except OSError as e:
            raise SystemExit(
                f"could not listen on {self.cfg.host}:{self.cfg.http_port}: {e.strerror or e} "
                "(port in use? pass --http-port)"
            ) from None
        try:
            self.node_api.reserve()
        except OSError as e:
            raise SystemExit(
                f"could not listen on {self.cfg.host}:{self.cfg.node_api_port}: {e.strerror or e} "
                "(port in use? pass --node-api-port, or 0 for a free one)"
            ) from None
        self.agent.node_api = self.node_api.url

    async def start(self) -> list[asyncio.Task[None]]:
        """The relay listening, the gateway processes started (the API must answer by now); the
        running parts as tasks."""
        try:
            # Before the agent's first heartbeat, which tells the other nodes where it is.
            self.agent.relay = await self.relay.start(self.cfg.host, self.cfg.relay_port)
        except OSError as e:
            raise SystemExit(
                f"the relay could not listen on {self.cfg.host}:{self.cfg.relay_port}: {e.strerror or e} "
                "(port in use? pass --relay-port)"
            ) from None
        try:
            made = await self.api.post(f"/v1/nodes/{self.cfg.name}/gateway-token")
        except ApiError as e:
            raise SystemExit(f"the API gave no token for this node's gateway: {e.message}") from None
        self.gateways.token = made["token"]
        try:
            await self.gateways.start()
        except RuntimeError as e:
            raise SystemExit(f"the gateway could not start: {e}") from None
        return [
            asyncio.create_task(self.gateways.run(), name="the gateway processes"),
            asyncio.create_task(self.node_api.serve(), name="the node API"),
            asyncio.create_task(self.agent.run(), name="the node agent"),
            asyncio.create_task(self.sampler.run(), name="usage and the live view"),
        ]

    async def stop(self) -> None:
        await self.gateways.stop()
        await self.relay.close()
        await self.node_api.stop()
        await self.api.aclose()


async def run_node(cfg: NodeConfig, on_ready: Callable[[NodeConfig], None] | None = None) -> None:
    """`osless node join`: this machine's node, until SIGINT/SIGTERM or a part fails."""
    private_dir(cfg.data_dir)
    probe = AsyncApi(cfg.api_url, cfg.token, local_address=source_address(cfg.host))
    try:
        me = await probe.get("/v1/whoami")
    except ApiError as e:
        if e.status == 0:  # not an answer: unreachable, or no answer in time
            raise SystemExit(
                f"the API does not answer from this node's address {cfg.host}: {e.message} "
                "(--host is the address this node reaches the API from, and others reach it at)"
            ) from None
        raise SystemExit(f"the API at {cfg.api_url} refused this node's token: {e.message}") from None
    finally:
        await probe.aclose()
    if me.get("role") != "node":
        raise SystemExit(
            f"the token given is a {me.get('role')!r} token, not a node's: make one with "
            "`osless tokens create --role node --name NODE` on a machine that reaches the API"
        )
    # A node token acts for the one node it was made for (`node:NAME`): that is this node's name.
    mine = str(me.get("name", "")).removeprefix("node:")
    if not cfg.name:
        cfg.name = mine
    elif cfg.name != mine:
        raise SystemExit(
            f"the token given was made for node {mine!r}, not {cfg.name!r}: pass --name {mine}, or make "
            f"a token for this one (`osless tokens create --role node --name {cfg.name}`)"
        )
    sandboxed, protections = host_protections(cfg.sandbox)
    host = NodeHost(cfg, sandboxed=sandboxed, protections=protections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host.reserve()
    parts: list[asyncio.Task[None]] = []
    failed = False
    try:
        parts = await host.start()
        if on_ready:
            on_ready(cfg)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *parts], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        for task in parts:
            if task.done() and not task.cancelled():
                error = task.exception()
                log.error("%s stopped: %r", task.get_name(), error, exc_info=error)
                failed = True
    finally:
        for t in parts:
            t.cancel()
        await asyncio.gather(*parts, return_exceptions=True)
        with contextlib.suppress(Exception):
            await host.stop()
    if failed:
        raise SystemExit("the node stopped because a part of it failed (see the error above)")
