"""`osless builder --api URL`: a builder process, building queued deploys for the API at URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from osless.cli.output import fail, json_option

__all__ = ["MAX_CONCURRENCY", "builder"]

MAX_CONCURRENCY = 64


def builder(
    api: Annotated[str, typer.Option(help="The API's URL, e.g. http://10.0.0.1:7070.")],
    token: Annotated[
        str,
        typer.Option(
            envvar="OSLESS_BUILDER_TOKEN",
            help="A builder token (`osless tokens create --role builder`); or set OSLESS_BUILDER_TOKEN, "
            "which `ps` does not show.",
        ),
    ],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="The builder's folder: its image store and uv caches "
            "(default: ~/.local/share/osless-builder)."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Builds at once.")] = 1,
    sandbox: Annotated[bool, typer.Option(help="Run builds in sandboxes.")] = True,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(metavar="CIDR", help="Let builds reach this internal range (an index's; repeatable)."),
    ] = None,
    json_out: Annotated[bool, json_option("Say an error as one JSON object on stdout.")] = False,
) -> None:
    """Build the API's queued deploys, one at a time by default, until stopped."""
    import asyncio
    import contextlib
    import logging

    from osless.node.egress_rules import parse_networks
    from osless.server.builder import BuilderConfig, run_builder

    try:
        allowed = parse_networks(egress_allow or [])
    except ValueError as e:
        fail(str(e))
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        fail(f"--concurrency must be between 1 and {MAX_CONCURRENCY}, not {concurrency}")
    if not token.strip():
        fail("--token is empty: give a builder token (`osless tokens create --role builder`)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("osless.builder").setLevel(logging.INFO)
    folder = data_dir or Path(
        os.environ.get("OSLESS_BUILDER_DIR") or Path.home() / ".local/share/osless-builder"
    )
    cfg = BuilderConfig(
        api_url=api.rstrip("/"),
        token=token.strip(),
        data_dir=folder.expanduser().resolve(),
        sandbox=sandbox,
        concurrency=concurrency,
        egress_allow=allowed,
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_builder(cfg))
    except SystemExit as e:
        if isinstance(e.code, str):  # why it stopped (a second builder on its folder, a refused token)
            fail(e.code, "builder_stopped")
        raise
