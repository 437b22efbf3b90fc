"""`osless traces APP [--trace ID]`: an app's recent traces, read from its nodes, no collector needed."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, printable, table, when
from osless.errors import ApiError

__all__ = ["traces"]

TRACE_ID = re.compile(r"[0-9a-f]{32}")
MAX_APPS = 10  # apps one trace is followed into


def traces(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    trace: Annotated[
        str | None, typer.Option("--trace", help="One trace, by its id: its spans as a tree.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many traces, newest first (1 to 100).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """An app's recent traces (the spans its instances made, kept on its nodes), newest first; with
    --trace, one trace's spans as a tree with their durations, with those of the apps its calls
    reached (that you may read)."""
    if trace is not None and not TRACE_ID.fullmatch(trace):
        fail(f"--trace takes a trace id, 32 lowercase hex digits, not {trace[:80]!r}", "invalid_trace")
    if not 1 <= limit <= 100:
        fail(f"--limit takes 1 to 100, not {limit}", "invalid_limit")
    params: dict[str, str | int] = {"limit": limit, **({"trace": trace} if trace else {})}
    api = client()
    found = call(api.get, f"/v1/apps/{app_name}/traces", **params)
    if trace is not None:
        found = _across_apps(api, app_name, trace, found)
    if json_out:
        print_json(found)
        return
    for missing in found.get("missing", []):
        console.print(f"note: {printable(missing['message'])}", markup=False, highlight=False)
    items: list[dict[str, Any]] = found["traces"]
    if trace is not None:
        if not items:
            fail(
                f"no span of trace {trace} is held for app {app_name} (spans are kept a while, on the nodes)"
            )
        for line in tree(items[0]["spans"]):
            console.print(line, markup=False, highlight=False)
        return
    table(
        ["TRACE", "STARTED", "DURATION", "SPANS", "ROOT"],
        [
            [t["trace_id"], when(t["start"]), f"{t['duration_ms']:.1f} ms", len(t["spans"]), t["root"]]
            for t in items
        ],
    )


def _across_apps(api: Any, app_name: str, trace: str, found: dict[str, Any]) -> dict[str, Any]:
    """One trace, with the spans of the apps its calls reached (`osless.callee.app` of a CLIENT span),
    each asked of the API as this caller: an app it may not read is a note, not a failure."""
    items: list[dict[str, Any]] = found["traces"]
    spans: list[dict[str, Any]] = list(items[0]["spans"]) if items else []
    missing: list[dict[str, Any]] = list(found.get("missing", []))
    asked = {app_name}
    while len(asked) <= MAX_APPS:
        callees = {str(s["attributes"].get("osless.callee.app", "")) for s in spans if s["kind"] == "client"}
        todo = sorted(callees - asked - {""})
        if not todo:
            break
        for other in todo[: MAX_APPS + 1 - len(asked)]:
            asked.add(other)
            try:
                more = api.get(f"/v1/apps/{other}/traces", trace=trace)
            except ApiError as e:
                missing.append(
                    {"node": "", "message": f"the spans of app {other} are not shown: {e.message}"}
                )
                continue
            missing.extend(more.get("missing", []))
            for t in more["traces"]:
                spans.extend(t["spans"])
    if not spans:
        return {"traces": [], "missing": missing}
    start, end = min(s["start"] for s in spans), max(s["end"] for s in spans)
    root = items[0]["root"] if items else ""
    whole = {"trace_id": trace, "start": start, "duration_ms": round((end - start) * 1000, 3), "root": root}
    return {"traces": [{**whole, "spans": sorted(spans, key=lambda s: s["start"])}], "missing": missing}


def tree(spans: list[dict[str, Any]]) -> list[str]:
    """The spans of one trace as indented lines, each under its parent (those whose parent is not
    here at the top), in the order they started: name, duration, status, instance, span id."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: s["start"]):
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            ms = (s["end"] - s["start"]) * 1000
            error = "  ERROR" if s["status"] == "error" else ""
            where = f"{s.get('app', '')} {s.get('instance', '')}".strip()
            name = printable(s["name"])  # the app's: an escape in it must not reach the terminal
            lines.append(f"{'  ' * depth}{name}  {ms:.1f} ms{error}  [{where}] span {s['span_id']}")
            if depth < 64:  # a made-up parent chain cannot recurse without end
                walk(s["span_id"], depth + 1)

    walk(None, 0)
    return lines
