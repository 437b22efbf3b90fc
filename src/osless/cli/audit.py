"""`osless audit`: who wrote what to the platform, when, from where."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, parse_duration, print_json, table

__all__ = ["audit"]


def audit(
    app: Annotated[str | None, typer.Option(help="Only writes to this app.")] = None,
    since: Annotated[str | None, typer.Option(help="Only the last 90s, 15m, 12h, 30d...")] = None,
    limit: Annotated[int, typer.Option(help="At most this many entries (newest first).")] = 100,
    json_out: JsonOpt = False,
) -> None:
    """The audit log: every write to the API, who made it, from where, and how it ended."""
    params: dict[str, Any] = {"limit": limit}
    if app is not None:
        params["app"] = app
    if since is not None:
        params["since"] = time.time() - parse_duration(since, "--since")
    items = call(client().get, "/v1/audit", **params)["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["WHEN", "WHO", "ROLE", "WHAT", "STATUS", "APP", "FROM"],
        [
            [
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])),
                f"{e['name']} ({e['token']})",
                e["role"],
                f"{e['method']} {e['path']}",
                e["status"],
                e["app"] or "-",
                e["client"] or "-",
            ]
            for e in items
        ],
    )
