"""`osless tokens ...`: make tokens with a role (and one app, an expiry), list them, revoke them."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from osless.cli.credentials import call, client
from osless.cli.output import (
    JsonOpt,
    console,
    err_console,
    fail,
    parse_duration,
    print_json,
    table,
    until,
    when,
)

__all__ = ["tokens_app"]

tokens_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="API tokens: roles, scopes, expiry."
)
ROLES_HELP = (
    "admin (everything), deploy (deploy, roll back, scale, config, and read), read (read only), "
    "debug (read and app logs), invoke (call functions), node (a machine that runs apps: `osless node join`; "
    "--name is the node's), controller (the scheduler and autoscaler), builder (a build process: "
    "`osless builder`)"
)


@tokens_app.command("create")
def create(
    role: Annotated[str, typer.Option(help=ROLES_HELP)],
    app: Annotated[str | None, typer.Option(help="Limit the token to this app.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="Lifetime such as 12h, 30d or 2w (default: never expires).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name to tell it by (default: role and app).")] = None,
    functions: Annotated[
        str | None,
        typer.Option(
            help="An invoke token: the only functions it may invoke, comma-separated APP.FUNCTION or "
            "APP.* (for example orders.quote,billing.*)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Make a token. It is printed once, here: store it now."""
    if role == "node" and not name:
        fail("a node token is for one node: pass --name NODE, the name the node joins with")
    body: dict[str, object] = {"role": role}
    if app is not None:
        body["app"] = app
    if name is not None:
        body["name"] = name
    if expires is not None:
        body["expires_in_s"] = parse_duration(expires, "--expires")
    if functions is not None:
        body["functions"] = [f.strip() for f in functions.split(",") if f.strip()]
    made = call(client().post, "/v1/tokens", body)
    if json_out:
        print_json(made)
        return
    scope = f" for app {made['app']}" if made["app"] else ""
    if made.get("functions"):
        scope += f" invoking {', '.join(made['functions'])} only"
    err_console.print(
        f"{made['role']} token {made['id']} ({made['name']}){scope}, expires {until(made['expires_at'])}. "
        "It is shown only now:",
        markup=False,
    )
    sys.stdout.write(made["token"] + "\n")  # alone on stdout, for TOKEN=$(osless tokens create ...)


@tokens_app.command("ls")
def ls(json_out: JsonOpt = False) -> None:
    """Every token, without the token itself: role, app, expiry, creation and last use."""
    items = call(client().get, "/v1/tokens")["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["ID", "NAME", "ROLE", "APP", "EXPIRES", "CREATED", "LAST USED"],
        [
            [
                t["id"],
                t["name"],
                t["role"],
                t["app"] or "-",
                until(t["expires_at"]),
                when(t["created_at"]),
                when(t["last_used_at"]),
            ]
            for t in items
        ],
    )


@tokens_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID")],
    force: Annotated[
        bool, typer.Option(help="Revoke a node's token too: that node stops, its instances move elsewhere.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working at once."""
    call(client().delete, f"/v1/tokens/{token_id}" + ("?force=true" if force else ""))
    if json_out:
        print_json({"id": token_id, "revoked": True})
        return
    console.print(f"revoked token {token_id}", markup=False)
