"""`osless invoke`: call a function, and say why it failed where the platform can tell."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from osless.cli.credentials import client
from osless.cli.output import JsonOpt, fail, print_json
from osless.errors import ApiError

if TYPE_CHECKING:
    from osless.client import Api

__all__ = ["invoke"]

OOM_LOOK_S = 5.0  # the node reports an instance's exit within this (it is usually well under a second)
DEFAULT_MEMORY_MB = 256  # as `@app.function()` and `@app.web()` ask by default


def invoke(
    target: Annotated[str, typer.Argument(metavar="APP.FUNCTION")],
    event: Annotated[str | None, typer.Argument(metavar="[JSON|-]", help="The event; - reads stdin.")] = None,
    run_async: Annotated[
        bool,
        typer.Option(
            "--async",
            help="Queue it and answer at once with the invocation (its id: `osless invocation ID`); "
            "run at least once, retried as the function says.",
        ),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="With --async: the same key for the same function within 24 h is accepted once."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Call a function synchronously and print its JSON result (with --json, errors too)."""
    app_name, dot, function = target.partition(".")
    if not dot or not app_name or not function:
        fail(f"give the function as APP.FUNCTION (for example hello.greet), not {target!r}", "invalid_target")
    raw = sys.stdin.read() if event == "-" else (event if event is not None else "null")
    try:
        json.loads(raw)
    except ValueError as e:
        fail(
            f'the event is not valid JSON ({e}); quote it, for example \'{{"name": "Ada"}}\'', "invalid_event"
        )
    if idempotency_key is not None and not run_async:
        fail("--idempotency-key goes with --async", "invalid_option")
    api = client()
    if run_async:
        headers = {"content-type": "application/json", "x-osless-invocation-type": "Event"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        try:
            found = api.post(
                f"/v1/apps/{app_name}/functions/{function}:invoke", content=raw.encode(), headers=headers
            )
        except ApiError as e:
            fail(e.message, e.code)
        if json_out:
            print_json(found)
        else:
            print(f"{found['id']} {found['state']} (see it with: osless invocation {found['id']})")
        return
    started = time.time()
    try:
        result = api.post(
            f"/v1/apps/{app_name}/functions/{function}:invoke",
            content=raw.encode(),
            headers={"content-type": "application/json"},
            timeout=None,  # a function may run for up to an hour; the platform enforces its timeout_s
        )
    except ApiError as e:
        # An instance killed mid-call just closes the connection: its exit, as its node reports it, says why.
        closed = e.status == 502 and "closed the connection" in e.message
        if closed and (oom := _out_of_memory(api, app_name, function, started)):
            fail(oom, "out_of_memory")
        traceback = str(e.detail["traceback"]) if e.detail.get("traceback") else None
        if json_out:  # the function's traceback goes with its error, in one document
            fail(e.message, e.code, **({"traceback": traceback} if traceback else {}))
        if traceback:
            sys.stderr.write(traceback.rstrip() + "\n")
        fail(e.message, e.code)
    print_json(result)


def _out_of_memory(api: Api, app_name: str, function: str, since: float) -> str | None:
    """What to tell the caller if the call's instance was just killed for memory."""
    deadline = time.monotonic() + OOM_LOOK_S
    while True:
        try:
            info = api.get(f"/v1/apps/{app_name}")
        except ApiError:
            return None  # a courtesy: the call's own error is said anyway
        # The node's clock, not this one: a second's slack for the two.
        exits = [e for i in info["instances"] if (e := i["status"].get("last_exit")) and e["at"] >= since - 1]
        if any(e["reason"].startswith("out of memory") for e in exits):
            return (
                f"the function ran out of memory (limit {_limit_mb(info)} MB): raise memory_mb in "
                f"@app.function(memory_mb=...) of {function}"
            )
        if exits or time.monotonic() > deadline:
            return None  # it ended otherwise, or its node has not said
        time.sleep(0.1)


def _limit_mb(info: dict[str, Any]) -> int:
    """An instance's memory limit: it serves every handler of its release, so the largest they ask."""
    manifest = (info.get("release") or {}).get("manifest") or {}
    handlers = [*(manifest.get("functions") or {}).values(), manifest.get("web") or {}]
    return max((int(h.get("memory_mb") or 0) for h in handlers), default=0) or DEFAULT_MEMORY_MB
