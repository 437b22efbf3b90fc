"""`osless up`: every part of the platform on one machine, with state in SQLite.

The API's process (`server.api.ApiHost`: the API, the controllers, the collector, the builder) and
this machine's node (`server.node.NodeHost`: the agent and the gateway processes), which reaches the
API over HTTP with a node token, exactly as it would from another machine. The gateway runs in
processes of its own (`gateway.pool`), one per core; the rest share this process's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from osless.gateway.pool import default_count
from osless.gateway.proxy import DEFAULT_TRACE_SAMPLE
from osless.node.egress_rules import Network
from osless.server.api import (
    ApiConfig,
    ApiHost,
    fresh_token,
    private_data_dir,
    save_credentials,
    wait_for_stop,
)
from osless.server.node import NodeConfig, NodeHost, default_node_name, host_protections

__all__ = ["UpConfig", "run", "save_credentials"]

log = logging.getLogger("osless")


@dataclass
class UpConfig:
    data_dir: Path
    api_port: int = 7070
    http_port: int = 8080
    host: str = "127.0.0.1"
    gateways: int = field(default_factory=default_count)  # gateway processes sharing http_port
    trace_sample: float = DEFAULT_TRACE_SAMPLE  # of the traces a gateway starts, past the first each second
    gateway_metrics: bool = True  # `--no-gateway-metrics`: the gateways count no requests
    node_name: str = field(default_factory=lambda: default_node_name())
    max_upload_mb: int = 100
    save_credentials: bool = True
    sandbox: bool = True
    secret_key_file: Path | None = None
    # Internal ranges apps may reach when they list them (`--egress-allow`); everything internal is
    # refused otherwise, whatever an app lists (`node/egress_rules`).
    egress_allow: list[Network] = field(default_factory=list)
    nats_port: int = 0  # the message engine's (a nats-server child, 127.0.0.1 only); 0: a free one

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


async def run(cfg: UpConfig, on_ready: Callable[[str, str, str], None] | None = None) -> None:
    """Start everything, call `on_ready(api_url, gateway_url, token)`, run until SIGINT/SIGTERM."""
    data_dir = cfg.data_dir.resolve()
    private_data_dir(data_dir)
    sandboxed, protections = host_protections(cfg.sandbox)
    api = ApiHost(
        ApiConfig(
            data_dir=data_dir,
            api_port=cfg.api_port,
            host=cfg.host,
            max_upload_mb=cfg.max_upload_mb,
            sandbox=cfg.sandbox,
            secret_key_file=cfg.secret_key_file,
            egress_allow=cfg.egress_allow,
            gateway_url=cfg.gateway_url,
            nats_port=cfg.nats_port,
        ),
        command="osless up",
    )
    resources = await api.open(sandboxed=sandboxed)
    node_token = await fresh_token(resources, f"node:{cfg.node_name}", "node")
    node = NodeHost(
        NodeConfig(
            api_url=cfg.api_url,
            token=node_token,
            data_dir=data_dir,
            name=cfg.node_name,
            host=cfg.host,
            http_port=cfg.http_port,
            gateways=cfg.gateways,
            trace_sample=cfg.trace_sample,
            gateway_metrics=cfg.gateway_metrics,
            sandbox=cfg.sandbox,
            egress_allow=cfg.egress_allow,
        ),
        sandboxed=sandboxed,
        protections=protections,
    )
    servers: list[asyncio.Task[None]] = []
    parts: list[asyncio.Task[None]] = []
    failed = False
    try:
        node.reserve()
        servers = [await api.serve()]
        # Saved once the API answers, before the gateway does: whoever sees the gateway up finds them.
        if cfg.save_credentials:
            save_credentials(cfg.api_url, api.token, cfg.gateway_url)
        parts = await node.start()
        parts += api.start_controllers()
        # What start-up built lives as long as the process: out of the collector's way, so that a
        # collection triggered by requests does not walk it each time.
        gc.freeze()
        if on_ready:
            on_ready(cfg.api_url, cfg.gateway_url, api.token)
        failed = await wait_for_stop([*servers, *parts])
    finally:
        node_parts = [t for t in parts if t not in api.tasks]
        for t in node_parts:
            t.cancel()
        await asyncio.gather(*node_parts, return_exceptions=True)
        with contextlib.suppress(Exception):
            await node.stop()
        await api.stop(servers)
    if failed:
        raise SystemExit("osless stopped because a part of it failed (see the error above)")
