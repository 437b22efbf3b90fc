"""`osless debug stack|profile`: see inside a running instance, through the API (no SSH)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from osless.cli import attach as _attach
from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json
from osless.errors import ApiError

__all__ = ["debug_app"]

debug_app = typer.Typer(
    rich_markup_mode=None, help="Debug a running app: stacks, profiles, a debugger (needs `debug`), a shell."
)
AppArg = Annotated[str, typer.Argument(metavar="APP")]
InstanceOpt = Annotated[
    str | None, typer.Option("--instance", help="One instance (`osless instances APP` lists them).")
]
CHUNK = 1024 * 1024
# What a terminal acts on rather than shows (escape sequences, bidirectional overrides): the app's
# function and thread names are the app's to choose.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _shown(text: Any) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


@debug_app.command("stack")
def stack(app_name: AppArg, instance: InstanceOpt = None, json_out: JsonOpt = False) -> None:
    """Every thread's Python stack in the app's running instances, without stopping them."""
    api = client()
    got = call(api.post, f"/v1/apps/{app_name}/debug/stack", params={"instance": instance})
    if json_out:
        print_json(got)
        return
    for item in got["items"]:
        console.print(f"instance {_shown(item['instance'])} on node {_shown(item['node'])}", markup=False)
        if item.get("error"):
            console.print(f"  could not be read: {_shown(item['error'])}", markup=False)
        for t in item["threads"]:
            state = "active" if t.get("active") else "idle"
            console.print(f"  Thread {t.get('thread_id')} ({state}): {_shown(t.get('name'))}", markup=False)
            for f in t["frames"]:
                where = f"{_shown(f.get('file'))}:{f.get('line')}"
                console.print(f"      {_shown(f.get('function'))} ({where})", markup=False)
        console.print("")
    if got.get("truncated"):
        console.print(
            f"(only the first {len(got['items'])} instances: name one with --instance)", markup=False
        )


@debug_app.command("profile")
def profile(
    app_name: AppArg,
    instance: InstanceOpt = None,
    seconds: Annotated[int, typer.Option("--seconds", min=1, max=60, help="How long to sample.")] = 10,
    fmt: Annotated[str, typer.Option("--format", help="svg (a flame graph) or speedscope (JSON).")] = "svg",
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Where to write it (several instances: one file each, NAME.ID.EXT)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """A sampling profile of the app's running instances (py-spy), as a flame graph."""
    if fmt not in ("svg", "speedscope"):
        fail("--format must be svg or speedscope")
    api = client()
    if instance is not None:
        ids = [instance]
    else:
        items = call(api.get, "/v1/instances", app=app_name)["items"]
        ids = [i["id"] for i in items if (i.get("status") or {}).get("phase") == "ready"]
        if not ids:  # the API says why (no such app, or nothing running)
            call(api.post, f"/v1/apps/{app_name}/debug/profile", params={"seconds": 1, "format": fmt})
            fail(f"app {app_name} has no running instance")
    dest = output or Path("profile.svg" if fmt == "svg" else "profile.speedscope.json")
    paths = {i: dest if len(ids) == 1 else dest.with_name(f"{dest.stem}.{i}{dest.suffix}") for i in ids}
    errors: dict[str, ApiError] = {}

    def take(iid: str) -> None:
        params = {"instance": iid, "seconds": seconds, "format": fmt}
        tmp = paths[iid].with_name(f".{paths[iid].name}.osless-profile")
        try:
            with (
                api.raw("POST", f"/v1/apps/{app_name}/debug/profile", params=params) as resp,
                open(tmp, "wb") as out,
            ):
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
            tmp.replace(paths[iid])
        except ApiError as e:
            tmp.unlink(missing_ok=True)
            errors[iid] = e
        except OSError as e:
            tmp.unlink(missing_ok=True)
            errors[iid] = ApiError(0, "unreachable", str(e))

    if not json_out:
        console.print(f"sampling {len(ids)} instance(s) of {app_name} for {seconds}s...", markup=False)
    workers = [threading.Thread(target=take, args=(i,)) for i in ids]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    written = [{"instance": i, "path": str(p)} for i, p in paths.items() if i not in errors]
    if errors and not written:
        first = next(iter(errors.values()))
        fail(first.message, first.code)
    if json_out:
        failed = [{"instance": i, "code": e.code, "message": e.message} for i, e in errors.items()]
        print_json({"items": written, "errors": failed})
        return
    for w2 in written:
        console.print(f"{w2['instance']} -> {w2['path']}", markup=False)
    for i, e in errors.items():
        console.print(f"{i}: {e.message}", markup=False, style="red")
    if errors:
        raise typer.Exit(1)


debug_app.command("attach")(_attach.attach)
debug_app.command("shell")(_attach.shell)
