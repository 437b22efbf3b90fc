"""`osless node join`: make this machine a node of a platform whose API runs elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from osless.cli.output import console, fail, json_option, print_json

node_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="This machine as a node: its agent and gateway."
)

MAX_GATEWAYS = 256


# The gateway's observability options, the same on `osless up` and `osless node join`.
TRACE_SAMPLE = 0.01  # gateway.proxy.DEFAULT_TRACE_SAMPLE, not imported: the CLI stays light
TraceSampleOpt = Annotated[
    float,
    typer.Option(
        help="Of the traces the gateway starts, the share recorded besides the first of each second "
        "(0 to 1; a client's sampled traceparent is always recorded)."
    ),
]
GatewayMetricsOpt = Annotated[
    bool,
    typer.Option(
        help="Count each request's status and latency in the gateway, for the node's GET /metrics, "
        "`osless top` and `osless usage` (off: those show no requests)."
    ),
]


def check_trace_sample(trace_sample: float) -> None:
    if not 0.0 <= trace_sample <= 1.0:
        fail(f"--trace-sample is a share of requests from 0 to 1, not {trace_sample}")


@node_app.command("join")
def join(
    api: Annotated[str, typer.Option(help="The API's URL, e.g. http://10.0.0.1:7070.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="OSLESS_NODE_TOKEN",
            help="A node token (`osless tokens create --role node --name NODE`); "
            "or set OSLESS_NODE_TOKEN, which `ps` does not show.",
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="This node's name (default: the one its token was made for).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="The node's own folder: logs, run dir, volumes (default: ~/.local/share/osless-node)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address the gateway listens on, and other parts reach.")
    ] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="Port of this node's gateway.")] = 8080,
    relay_port: Annotated[
        int,
        typer.Option(
            help="Port (on --host) where other nodes' gateways reach this node's instances; "
            "0: a free one, reported in the node's heartbeat.",
            min=0,
            max=65535,
        ),
    ] = 0,
    node_api_port: Annotated[
        int,
        typer.Option(help="Port of the node API, which serves its logs to the API (0: a free port)."),
    ] = 0,
    gateways: Annotated[
        int | None,
        typer.Option(
            help="Gateway processes sharing the HTTP port (default: one per core).", show_default=False
        ),
    ] = None,
    sandbox: Annotated[
        bool, typer.Option(help="Run apps in sandboxes (namespaces, seccomp, cgroups).")
    ] = True,
    trace_sample: TraceSampleOpt = TRACE_SAMPLE,
    gateway_metrics: GatewayMetricsOpt = True,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CIDR", help="Let apps reach this internal range when they list it (repeatable)."
        ),
    ] = None,
    json_out: Annotated[
        bool, json_option("Once joined, print one JSON object: the node, its gateway and data dir.")
    ] = False,
) -> None:
    """Run this machine's node agent and gateway against the API at --api, until stopped."""
    import asyncio
    import contextlib
    import logging

    from osless.node.egress_rules import parse_networks
    from osless.server.node import NodeConfig, run_node

    try:
        allowed = parse_networks(egress_allow or [])
    except ValueError as e:
        fail(str(e))
    if gateways is not None and not 1 <= gateways <= MAX_GATEWAYS:
        fail(f"--gateways must be between 1 and {MAX_GATEWAYS} (one per core is the default), not {gateways}")
    check_trace_sample(trace_sample)
    if not token.strip():
        fail("--token is empty: give a node token (`osless tokens create --role node --name NODE`)")
    if not 0 <= node_api_port <= 65535:
        fail(f"--node-api-port must be a port from 0 to 65535 (0: a free one), not {node_api_port}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = NodeConfig(
        api_url=api.rstrip("/"),
        token=token.strip(),
        data_dir=(
            data_dir or Path(os.environ.get("OSLESS_NODE_DIR") or Path.home() / ".local/share/osless-node")
        )
        .expanduser()
        .resolve(),
        name=name or "",  # the token's node, once the API says which (`run_node`)
        host=host,
        http_port=http_port,
        relay_port=relay_port,
        node_api_port=node_api_port,
        sandbox=sandbox,
        egress_allow=allowed,
        trace_sample=trace_sample,
        gateway_metrics=gateway_metrics,
    )
    if gateways is not None:
        cfg.gateways = gateways

    def ready(c: NodeConfig) -> None:
        if json_out:
            print_json(
                {"node": c.name, "api": c.api_url, "gateway": c.gateway_url, "data_dir": str(c.data_dir)}
            )
            return
        console.print(f"[bold green]node {c.name} joined[/] {c.api_url}  data: {c.data_dir}")
        console.print(f"  Gateway: {c.gateway_url}   ({c.gateways} process{'es' if c.gateways > 1 else ''})")

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(run_node(cfg, on_ready=ready))
        except ImportError:
            asyncio.run(run_node(cfg, on_ready=ready))
