"""`osless cluster up`: etcd, a server and N nodes on this machine, each a process of its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from osless.cli.output import console, fail, json_option, print_json

__all__ = ["cluster_app"]

cluster_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="A whole cluster on this machine, to try it out."
)

DEFAULT_CLUSTER_DIR = Path(
    os.environ.get("OSLESS_CLUSTER_DIR") or Path.home() / ".local/share/osless-cluster"
)
MAX_NODES = 64  # 127.0.0.2 ... on loopback


@cluster_app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="How many nodes, each on its own loopback address.")] = 3,
    dir: Annotated[
        Path, typer.Option("--dir", help="etcd's data, the server's and each node's data dir, the logs.")
    ] = DEFAULT_CLUSTER_DIR,
    api_port: Annotated[int, typer.Option(help="Port of the REST API (on 127.0.0.1).")] = 7070,
    http_port: Annotated[
        int, typer.Option(help="Port of every node's gateway, each on the node's own address.")
    ] = 8080,
    etcd_port: Annotated[
        int, typer.Option(help="etcd's client port (its peer port is the next one).")
    ] = 2379,
    nats_port: Annotated[
        int, typer.Option(help="Port of the message engine (nats-server, on 127.0.0.1).")
    ] = 4222,
    gateways: Annotated[int, typer.Option(help="Gateway processes per node.")] = 1,
    sandbox: Annotated[
        bool, typer.Option(help="Run apps and builds in sandboxes (namespaces, seccomp, cgroups).")
    ] = True,
    json_out: Annotated[
        bool, json_option("Once ready, print one JSON object describing the cluster.")
    ] = False,
) -> None:
    """Start one etcd, one `osless server --etcd` and NODES `osless node join` processes (node k's
    gateway at http://127.0.0.(k+1):HTTP_PORT); save the CLI's credentials; stop it all on Ctrl-C."""
    import logging

    from osless.server.cluster import ClusterConfig, ClusterError, run_cluster

    if not 1 <= nodes <= MAX_NODES:
        fail(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if not 1 <= gateways <= 64:
        fail(f"--gateways must be between 1 and 64, not {gateways}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ClusterConfig(
        dir=dir.expanduser(),
        nodes=nodes,
        api_port=api_port,
        http_port=http_port,
        etcd_port=etcd_port,
        etcd_peer_port=etcd_port + 1,
        nats_port=nats_port,
        gateways=gateways,
        sandbox=sandbox,
    )

    def ready(cluster: dict[str, Any]) -> None:
        if json_out:
            print_json(cluster)
            return
        console.print(f"[bold green]osless cluster is up[/]  dir: {cluster['dir']}")
        console.print(f"  etcd:    {cluster['etcd']['url']}")
        console.print(f"  API:     {cluster['api']}   (credentials saved for the CLI)")
        for n in cluster["nodes"]:
            console.print(f"  node {n['name']}: gateway {n['gateway']}   pid {n['pid']}", markup=False)
        console.print("  Logs in", str(Path(cluster["dir"]) / "logs") + ";", "Ctrl-C stops it all.")

    try:
        run_cluster(cfg, on_ready=ready)
    except ClusterError as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass
