"""`osless functions ...`: which apps may call an app's functions (set by the callee's owner)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when

__all__ = ["functions_app"]

functions_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Who may call an app's functions: apps allowed by the callee's owner (as Lambda's add-permission).",
)

TARGET_HELP = "APP.FUNCTION, or APP.* for every function of the app."
CALLER_HELP = "The app allowed to call it (from its code: osless.function('APP.FUNCTION').call(event))."


def _split(target: str) -> tuple[str, str]:
    app, dot, function = target.partition(".")
    if not dot or not app or not function:
        fail(f"{target!r}: name the function as APP.FUNCTION (or APP.* for all of them), e.g. orders.quote")
    return app, function


@functions_app.command("allow")
def allow(
    target: Annotated[str, typer.Argument(metavar="APP.FUNCTION", help=TARGET_HELP)],
    app: Annotated[str, typer.Option("--app", help=CALLER_HELP)],
    json_out: JsonOpt = False,
) -> None:
    """Let an app call a function (needs deploy on the function's app)."""
    callee, function = _split(target)
    made = call(client().put, f"/v1/apps/{callee}/functions/{function}/callers/{app}", None)
    if json_out:
        print_json(made)
        return
    console.print(f"app {app} may call {callee}.{function}", markup=False)


@functions_app.command("deny")
def deny(
    target: Annotated[str, typer.Argument(metavar="APP.FUNCTION", help=TARGET_HELP)],
    app: Annotated[str, typer.Option("--app", help="The app whose grant is taken back.")],
    json_out: JsonOpt = False,
) -> None:
    """Take back what `allow` gave (calls already under way finish)."""
    callee, function = _split(target)
    call(client().delete, f"/v1/apps/{callee}/functions/{function}/callers/{app}")
    if json_out:
        print_json({"app": callee, "function": function, "caller": app, "allowed": False})
        return
    console.print(f"app {app} may no longer call {callee}.{function}", markup=False)


@functions_app.command("grants")
def grants(
    app: Annotated[str, typer.Argument(metavar="APP")],
    json_out: JsonOpt = False,
) -> None:
    """The apps allowed to call APP's functions."""
    items: list[dict[str, Any]] = call(client().get, f"/v1/apps/{app}/callers")["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["FUNCTION", "CALLER", "BY", "SINCE"],
        [[f"{g['app']}.{g['function']}", g["caller"], g["by"], when(g["at"])] for g in items],
    )
