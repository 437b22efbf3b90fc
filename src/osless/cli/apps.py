"""`osless apps ...` (list, show, delete) and `osless restart`."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when

if TYPE_CHECKING:
    from osless.client import Api

__all__ = ["apps_app", "restart"]

apps_app = typer.Typer(rich_markup_mode=None, help="List apps, show one, or delete one.")
AppArg = Annotated[str, typer.Argument(metavar="APP")]
RESTART_TIMEOUT_S = 120.0


@apps_app.callback(invoke_without_command=True)
def apps(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List apps."""
    if ctx.invoked_subcommand is not None:
        return
    api = client()
    items = call(api.get, "/v1/apps")["items"]
    statuses = {s["app"]: s for s in call(api.get, "/v1/appstatus")["items"]}
    items = [{**a, "status": statuses.get(a["name"]) or {}} for a in items]
    if json_out:
        print_json(items)
        return
    table(
        ["APP", "RELEASE", "MIN", "MAX", "DESIRED", "WHY", "UPDATED"],
        [
            [
                a["name"],
                f"v{a['current_release']}" if a["current_release"] else "-",
                a["min"],
                a["max"],
                "-" if a["status"].get("desired") is None else a["status"]["desired"],
                a["status"].get("scale_reason") or "-",
                when(a["updated_at"]),
            ]
            for a in items
        ],
    )


@apps_app.command("show")
def apps_show(app_name: Annotated[str, typer.Argument(metavar="APP")], json_out: JsonOpt = False) -> None:
    """One app: its release, instances, URLs, and which apps it calls and is called by."""
    api = client()
    info = call(api.get, f"/v1/apps/{app_name}")
    ends = call(api.get, f"/v1/apps/{app_name}/endpoints")
    if json_out:
        print_json({**info, "endpoints": ends})
        return
    release = info.get("release") or {}
    console.print(
        f"[bold]{app_name}[/]  release v{info['current_release'] or '-'}  "
        f"image {str(release.get('image', '-'))[:12]}  min {info['min']} max {info['max']}"
    )
    status = info["status"]
    desired = "-" if status.get("desired") is None else status["desired"]
    console.print(
        f"  desired:     {desired}   ({status.get('scale_reason') or 'no decision yet'})",
        highlight=False,
        markup=False,
    )
    ready = len(ends["instances"])
    console.print(f"  web:         {ends['url']}   (from other apps: {ends['internal_url']})")
    console.print(f"  instances:   {ready} ready of {len(info['instances'])}")
    for label, edges in (("calls", info.get("calls") or {}), ("called by", info.get("called_by") or {})):
        text = ", ".join(f"{name} ({n})" for name, n in sorted(edges.items())) or "-"
        console.print(f"  {label + ':':<12} {text}", highlight=False, markup=False)


@apps_app.command("delete")
def apps_delete(
    app_name: AppArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete an app: its releases, config and secrets, instances, deploys, logs and volumes."""
    if not yes:
        if not sys.stdin.isatty():
            fail(
                f"not deleting {app_name} without a yes: pass --yes to delete it from a script",
                "not_confirmed",
            )
        # What DELETE /v1/apps/{app} removes (with the volumes' data, on each node once nothing of the
        # app runs there): nothing of it can be brought back.
        asked = (
            f"Delete app {app_name} and all its releases, config and secrets, instances, deploys, logs "
            "and volumes (their data too)?"
        )
        if not typer.confirm(asked, default=False, err=True):
            fail(f"{app_name} not deleted", "not_confirmed")
    call(client().delete, f"/v1/apps/{app_name}")
    if json_out:
        print_json({"app": app_name, "deleted": True})
        return
    console.print(f"deleted app {app_name}", markup=False)


def restart(
    app_name: AppArg,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return at once, without waiting for the new instances.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Replace every instance of APP with fresh ones of the same release.

    Rolling: the new ones start first, and the old ones stop once they are ready, so the app keeps
    serving."""
    api = client()
    spec = call(api.post, f"/v1/apps/{app_name}/restart")
    if not no_wait:
        with console.status(f"Restarting {app_name}", spinner="dots"):
            _wait_restarted(api, app_name, int(spec["restart"]))
    if json_out:
        print_json(spec)
        return
    console.print(
        f"[green]{app_name}[/]: " + ("restarting" if no_wait else f"restarted (v{spec['current_release']})")
    )


def _wait_restarted(api: Api, app_name: str, restart: int) -> None:
    """Until every instance of the app was made for this restart, and one of them is ready (or the
    app is at zero): the scheduler deletes the old ones only once the new ones are ready."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    pause = 0.05
    while time.monotonic() < deadline:
        info = call(api.get, f"/v1/apps/{app_name}")
        if info.get("restart", 0) != restart or info.get("current_release") is None:
            return  # restarted again, or a new release rolls out: what we asked is overtaken
        mine = [i for i in info["instances"] if _made_for(i, info, restart)]
        old = [i for i in info["instances"] if not _made_for(i, info, restart)]
        ready = any(i["status"]["phase"] == "ready" for i in mine)
        if not old and (ready or not info["status"].get("desired")):
            return
        failing = [i["status"]["last_exit"]["reason"] for i in mine if i["status"].get("last_exit")]
        if mine and len(failing) == len(mine) and all(i["status"]["restarts"] >= 2 for i in mine):
            fail(
                f"the new instances of {app_name} keep failing ({failing[0]}); see `osless logs {app_name}`. "
                "The old ones keep serving.",
                "restart_failing",
            )
        time.sleep(pause)
        pause = min(pause * 1.25, 0.25)  # well within the API's requests per token
    fail(
        f"{app_name}'s new instances were not all ready within {RESTART_TIMEOUT_S:.0f}s; "
        f"see `osless ps {app_name}`",
        "restart_timeout",
    )


def _made_for(instance: dict[str, Any], app: dict[str, Any], restart: int) -> bool:
    return bool(instance["release"] == app["current_release"] and instance.get("restart", 0) == restart)
