"""`osless server --etcd URL`: the API and the controllers on etcd, for nodes that join from elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from osless.cli.output import console, fail, json_option, print_json

__all__ = ["server"]

DEFAULT_SERVER_DIR = Path(os.environ.get("OSLESS_SERVER_DIR") or Path.home() / ".local/share/osless-server")


def server(
    etcd: Annotated[
        str,
        typer.Option(
            help="The etcd members, and the root the platform's keys live under: "
            "etcd://HOST:2379,HOST:2379.../ROOT (ROOT, /osless by default, may be left out); "
            "over TLS etcds://HOST:2379.../ROOT?ca=CA.pem&cert=CLIENT.pem&key=CLIENT-KEY.pem.",
        ),
    ],
    data_dir: Annotated[
        Path,
        typer.Option(
            help="This server's folder: images, sources, its admin token, the secret key, its builder's."
        ),
    ] = DEFAULT_SERVER_DIR,
    api_port: Annotated[int, typer.Option(help="Port of the REST API.")] = 7070,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    advertise_url: Annotated[
        str,
        typer.Option(
            help="This server's API URL as the other servers reach it, for images and sources they lack "
            "(default: http://HOST:API_PORT)."
        ),
    ] = "",
    secret_key_file: Annotated[
        Path | None,
        typer.Option(
            help="The key that encrypts secrets; every server of a platform needs the same one "
            "(default: DATA_DIR/secret.key; or set OSLESS_SECRET_KEY)."
        ),
    ] = None,
    nats: Annotated[
        str,
        typer.Option(
            envvar="OSLESS_NATS",
            help="The message engine every server of the platform shares: nats://[TOKEN@]HOST:4222 "
            "(a 3-node JetStream cluster for production; put the token in OSLESS_NATS, not argv). "
            "Default: a nats-server of its own (one server only).",
        ),
    ] = "",
    nats_replicas: Annotated[
        int,
        typer.Option(help="Replicas of the platform's JetStream streams: 3 on a 3-node JetStream cluster."),
    ] = 1,
    sandbox: Annotated[bool, typer.Option(help="Run builds in sandboxes.")] = True,
    builder: Annotated[
        bool,
        typer.Option(
            help="Start a builder process beside the API (builds need one, here or `osless builder`)."
        ),
    ] = True,
    save: Annotated[
        bool, typer.Option("--save-credentials/--no-save-credentials", help="Save the CLI's credentials.")
    ] = True,
    json_out: Annotated[
        bool, json_option("Once ready, print one JSON object: the API and the token file.")
    ] = False,
) -> None:
    """Run the API, the controllers, the collector and a builder process on etcd; no node: machines
    join with `osless node join --api URL`."""
    import asyncio
    import contextlib
    import logging

    from osless.server.api import ApiConfig, run_server

    if advertise_url and not advertise_url.startswith(("http://", "https://")):
        fail(f"--advertise-url takes an http:// or https:// URL, not {advertise_url!r}")
    if not advertise_url and host in ("0.0.0.0", "::"):
        fail(f"listening on {host}, give the URL other servers reach this one at: --advertise-url URL")
    if not etcd.startswith(("etcd://", "etcds://")):
        fail(
            "--etcd takes an etcd:// URL (etcd://HOST:2379[,HOST:2379...][/ROOT], or etcds://...?ca=PATH "
            f"for TLS), not {etcd!r}"
        )
    if nats and not nats.startswith(("nats://", "tls://")):
        fail(f"--nats takes a nats:// URL (nats://[TOKEN@]HOST:4222), not {nats!r}")
    if not 1 <= nats_replicas <= 5:
        fail(
            f"--nats-replicas must be between 1 and 5 (3 on a 3-node JetStream cluster), not {nats_replicas}"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ApiConfig(
        data_dir=data_dir.expanduser(),
        store_url=etcd,
        api_port=api_port,
        host=host,
        advertise_url=advertise_url.rstrip("/"),
        sandbox=sandbox,
        builder=builder,
        secret_key_file=secret_key_file,
        nats_url=nats,
        nats_replicas=nats_replicas,
    )

    def ready(api_url: str, token: str) -> None:
        token_file = cfg.data_dir.resolve() / "admin-token"
        if json_out:
            print_json(
                {
                    "api": api_url,
                    "store": etcd,
                    "data_dir": str(cfg.data_dir.resolve()),
                    "token_file": str(token_file),
                }
            )
            return
        console.print(f"[bold green]osless server is up[/]  data: {cfg.data_dir.resolve()}")
        console.print(f"  API:     {api_url}   (docs: {api_url}/docs, with a token)")
        console.print(f"  Store:   {etcd}")
        console.print(f"  Admin token: {token_file}" + ("; saved for the CLI" if save else ""))
        console.print(
            "  Nodes join with: osless tokens create --role node --name NODE, then "
            f"osless node join --api {api_url} --name NODE (token in OSLESS_NODE_TOKEN)"
        )

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(run_server(cfg, save=save, on_ready=ready))
        except ImportError:
            asyncio.run(run_server(cfg, save=save, on_ready=ready))
