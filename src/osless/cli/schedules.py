"""`osless schedule ls|pause|resume|history`: an app's schedules (`@app.schedule`) and their runs."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, until, when

__all__ = ["schedule_app"]

schedule_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="An app's schedules (@app.schedule): list, pause, resume, and their runs.",
)

TARGET_HELP = "APP.NAME: the schedule NAME (its function's name) of the app APP."


def _split(target: str) -> tuple[str, str]:
    app, dot, name = target.partition(".")
    if not dot or not app or not name:
        fail(f"{target!r}: name the schedule as APP.NAME (see `osless schedule ls APP`)", "invalid_target")
    return app, name


def _every(s: dict[str, Any]) -> str:
    if s.get("cron"):
        return f"{s['cron']} ({s['tz']})"
    return f"every {s['every_s']}s"


@schedule_app.command("ls")
def ls(
    target: Annotated[str, typer.Argument(metavar="APP[.NAME]", help="An app, or one of its schedules.")],
    json_out: JsonOpt = False,
) -> None:
    """The schedules of an app's current release: when, paused or not, the last and next tick."""
    app, _, name = target.partition(".")
    items = call(client().get, f"/v1/apps/{app}/schedules")["items"]
    if name:
        items = [s for s in items if s["name"] == name]
        if not items:
            fail(f"app {app!r} has no schedule {name!r} in its current release", "unknown_schedule")
    if json_out:
        print_json(items)
        return
    table(
        ["NAME", "WHEN", "CATCH UP", "STATE", "LAST TICK", "NEXT TICK"],
        [
            [
                s["name"],
                _every(s),
                "yes" if s["catch_up"] else "no",
                "paused" if s["paused"] else "active",
                when(s["last_tick"]),
                until(s["next_tick"]),
            ]
            for s in items
        ],
    )


def _set(target: str, action: str, json_out: bool) -> None:
    app, name = _split(target)
    done = call(client().post, f"/v1/apps/{app}/schedules/{name}:{action}")
    if json_out:
        print_json(done)
        return
    console.print(f"schedule {app}.{name} {action}d", markup=False)


@schedule_app.command("pause")
def pause(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=TARGET_HELP)], json_out: JsonOpt = False
) -> None:
    """Pause a schedule: none of its ticks runs until it is resumed (needs deploy)."""
    _set(target, "pause", json_out)


@schedule_app.command("resume")
def resume(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=TARGET_HELP)], json_out: JsonOpt = False
) -> None:
    """Resume a schedule: its next tick runs; those missed while paused do not (needs deploy)."""
    _set(target, "resume", json_out)


@schedule_app.command("history")
def history(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=TARGET_HELP)], json_out: JsonOpt = False
) -> None:
    """A schedule's recent runs, newest first: tick, invocation, outcome and duration."""
    app, name = _split(target)
    items = call(client().get, f"/v1/apps/{app}/schedules/{name}/runs")["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["TICK", "INVOCATION", "STATE", "ATTEMPTS", "DURATION", "ERROR"],
        [
            [
                when(r["tick"]),
                r["id"],
                r["state"],
                r["attempts"] if r["attempts"] is not None else "",
                f"{r['duration_s']:.3f}s" if r["duration_s"] is not None else "",
                r["error"] or "",
            ]
            for r in items
        ],
    )
