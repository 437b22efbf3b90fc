"""`osless invocations APP` and `osless invocation ID`: async invocations and their states."""

from __future__ import annotations

from typing import Annotated

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when

__all__ = ["invocation", "invocations"]

STATES = ("queued", "running", "succeeded", "failed", "dead")


def invocations(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    state: Annotated[str | None, typer.Option(help="Only those in this state: " + ", ".join(STATES))] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    json_out: JsonOpt = False,
) -> None:
    """An app's async invocations of the last 24 h, newest first."""
    if state is not None and state not in STATES:
        fail(f"--state takes one of {', '.join(STATES)}, not {state!r}", "invalid_state")
    params: dict[str, str | int] = {"limit": limit, **({"state": state} if state else {})}
    items = call(client().get, f"/v1/apps/{app_name}/invocations", **params)["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["ID", "FUNCTION", "STATE", "ATTEMPTS", "CREATED", "ERROR"],
        [
            [
                i["id"],
                i["function"],
                i["state"],
                i["attempts"],
                when(i["created_at"]),
                (i.get("error") or {}).get("message", "")[:60],
            ]
            for i in items
        ],
    )


def invocation(
    invocation_id: Annotated[str, typer.Argument(metavar="ID")], json_out: JsonOpt = False
) -> None:
    """One async invocation: its state, attempts, and its result or error."""
    found = call(client().get, f"/v1/invocations/{invocation_id}")
    if json_out:
        print_json(found)
        return
    console.print(
        f"{found['id']}: {found['app']}.{found['function']} {found['state']} "
        f"after {found['attempts']} attempt(s), created {when(found['created_at'])}",
        markup=False,
        highlight=False,
    )
    if found["state"] == "succeeded":
        print_json(found.get("result"))
    elif error := found.get("error"):
        console.print(f"error: {error.get('message', '')}", markup=False, highlight=False)
        if tb := error.get("traceback"):
            console.print(tb.rstrip(), markup=False, highlight=False)
