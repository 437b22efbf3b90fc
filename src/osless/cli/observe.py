"""`osless top` (apps and instances now, refreshed each second) and `osless usage APP` (what an app
used, per function and hour): the API's `GET /v1/top` and `GET /v1/apps/{app}/usage`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, print_json, table

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["top", "usage"]

REFRESH_S = 1.0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f}Mi"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _tables(view: dict[str, Any]) -> list[Table]:
    from rich.table import Table

    apps = Table(box=None, pad_edge=False, header_style="bold", title="apps", title_justify="left")
    for h in ("APP", "REQ/S", "P50 MS", "P99 MS", "ERR/S", "IN FLIGHT", "CPU", "MEMORY", "COLD", "INSTANCES"):
        apps.add_column(h, justify="left" if h == "APP" else "right")
    for name, a in sorted(view["apps"].items()):
        apps.add_row(
            name,
            f"{a['requests_per_s']:g}",
            _ms(a["p50_ms"]),
            _ms(a["p99_ms"]),
            f"{a['errors_per_s']:g}",
            str(a["in_flight"]),
            f"{a['cpu']:.2f}",
            _mib(a["memory"]),
            str(a["cold_starts"]),
            str(a["instances"]),
        )
    instances = Table(box=None, pad_edge=False, header_style="bold", title="instances", title_justify="left")
    for h in ("INSTANCE", "APP", "NODE", "PHASE", "CPU", "MEMORY"):
        instances.add_column(h, justify="right" if h in ("CPU", "MEMORY") else "left")
    for i in view["instances"]:
        instances.add_row(i["id"], i["app"], i["node"], i["phase"], f"{i['cpu']:.2f}", _mib(i["memory"]))
    return [apps, instances]


def top(json_out: JsonOpt = False) -> None:
    """Apps and instances now, refreshed each second: requests/s, p50 and p99 latency (last 10 s),
    errors/s, in flight, CPU (cores), memory, cold starts, node. Ctrl-C to stop."""
    api = client()
    if json_out:
        print_json(call(api.get, "/v1/top"))
        return
    from rich.console import Group
    from rich.live import Live

    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(Group(*_tables(call(api.get, "/v1/top"))), refresh=True)
                time.sleep(REFRESH_S)
    except KeyboardInterrupt:
        pass


def usage(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    since: Annotated[str, typer.Option(help="How far back: 24h, 90m, 7d (at most 35d).")] = "24h",
    json_out: JsonOpt = False,
) -> None:
    """What an app used, per function and per hour: invocations, errors, seconds in the gateway;
    CPU-seconds, GB-seconds (memory in use over time) and cold starts, from the kernel's accounting."""
    found = call(client().get, f"/v1/apps/{app_name}/usage", since=since)
    if json_out:
        print_json(found)
        return
    rows = []
    for hour in found["hours"]:
        when = time.strftime("%Y-%m-%d %H:00", time.localtime(hour["hour"]))
        rows.append(
            [
                when,
                "(app)",
                "",
                "",
                "",
                f"{hour['cpu_s']:.2f}",
                f"{hour['gb_s']:.3f}",
                f"{hour['cold_starts']:g}",
            ]
        )
        for fn, f in sorted(hour["functions"].items()):
            rows.append(
                [when, fn, f"{f['invocations']:g}", f"{f['errors']:g}", f"{f['duration_s']:.2f}", "", "", ""]
            )
    t = found["totals"]
    rows.append(
        [
            "total",
            "",
            f"{t['invocations']:g}",
            f"{t['errors']:g}",
            f"{t['duration_s']:.2f}",
            f"{t['cpu_s']:.2f}",
            f"{t['gb_s']:.3f}",
            f"{t['cold_starts']:g}",
        ]
    )
    table(["HOUR", "FUNCTION", "INVOCATIONS", "ERRORS", "SECONDS", "CPU-S", "GB-S", "COLD STARTS"], rows)
