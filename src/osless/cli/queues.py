"""`osless queue ...` (an app's queues: depth, send, peek, who may send) and `osless dlq ...` (the
dead-letter queues of queues and of functions' async invocations: list, show, redrive, purge)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when

__all__ = ["dlq_app", "queue_app"]

queue_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Queues: declared by @app.on_message('NAME') as APP.NAME; send, peek, stats, who may send.",
)
dlq_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Dead-letter queues: messages and async invocations that ran out of tries, with their errors.",
)

QUEUE_HELP = "The queue, as APP.QUEUE (e.g. shop.orders)."
DLQ_HELP = "APP.QUEUE (a queue's dead letters), or APP.FUNCTION with --function (its async invocations')."


def _split(target: str, what: str = "APP.QUEUE") -> tuple[str, str]:
    app, dot, name = target.partition(".")
    if not dot or not app or not name:
        fail(f"{target!r}: name it as {what}, e.g. shop.orders")
    return app, name


@queue_app.command("ls")
def ls(
    app: Annotated[str | None, typer.Argument(metavar="[APP]", help="Only this app's queues.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Every queue (or an app's), with its depth and its dead letters."""
    items: list[dict[str, Any]] = call(client().get, "/v1/queues", **({"app": app} if app else {}))["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["QUEUE", "DEPTH", "IN FLIGHT", "OLDEST", "DLQ", "BATCH", "CONCURRENCY"],
        [
            [
                f"{q['app']}.{q['queue']}",
                str(q["depth"]),
                str(q["in_flight"]),
                f"{q['oldest_age_s']:.1f}s",
                str(q["dlq_depth"]),
                str(q["batch_size"]),
                str(q["max_concurrency"]),
            ]
            for q in items
        ],
    )


@queue_app.command("stats")
def stats(
    target: Annotated[str, typer.Argument(metavar="APP.QUEUE", help=QUEUE_HELP)], json_out: JsonOpt = False
) -> None:
    """Depth (waiting and in flight), the oldest message's age, consumers, and the DLQ's depth."""
    app, queue = _split(target)
    found: dict[str, Any] = call(client().get, f"/v1/queues/{app}/{queue}")
    if json_out:
        print_json(found)
        return
    for key in ("depth", "waiting", "in_flight", "oldest_age_s", "consumers", "dlq_depth", "batch_size",
                "max_concurrency", "visibility_timeout_s", "retries"):  # fmt: skip
        console.print(f"{key:22} {found[key]}", markup=False)


@queue_app.command("send")
def send(
    target: Annotated[str, typer.Argument(metavar="APP.QUEUE", help=QUEUE_HELP)],
    body: Annotated[str, typer.Argument(metavar="JSON", help="The message: any JSON.")],
    json_out: JsonOpt = False,
) -> None:
    """Send one message (needs invoke on the app); its id once stored durably."""
    app, queue = _split(target)
    try:
        parsed = json.loads(body)
    except ValueError as e:
        fail(f"the message must be JSON: {e}")
    sent = call(client().post, f"/v1/queues/{app}/{queue}/messages", {"messages": [{"body": parsed}]})
    if json_out:
        print_json({"app": app, "queue": queue, "id": sent["ids"][0]})
        return
    console.print(f"sent {sent['ids'][0]} to {app}.{queue}", markup=False)


@queue_app.command("peek")
def peek(
    target: Annotated[str, typer.Argument(metavar="APP.QUEUE", help=QUEUE_HELP)],
    limit: Annotated[int, typer.Option(help="How many, oldest first (at most 100).")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """The oldest messages waiting or in flight, without taking them (needs deploy on the app)."""
    app, queue = _split(target)
    items = call(client().get, f"/v1/queues/{app}/{queue}/messages", limit=limit)["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["ID", "SENT", "BODY"],
        [[m["id"], when(m["sent_at"]), json.dumps(m["body"])[:80]] for m in items],
    )


@queue_app.command("allow")
def allow(
    target: Annotated[str, typer.Argument(metavar="APP.QUEUE", help=QUEUE_HELP)],
    app: Annotated[
        str, typer.Option("--app", help="The app allowed to send (osless.queue('APP.QUEUE').send).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Let another app send to a queue from its code (needs deploy on the queue's app)."""
    owner, queue = _split(target)
    made = call(client().put, f"/v1/apps/{owner}/queues/{queue}/senders/{app}", None)
    if json_out:
        print_json(made)
        return
    console.print(f"app {app} may send to {owner}.{queue}", markup=False)


@queue_app.command("deny")
def deny(
    target: Annotated[str, typer.Argument(metavar="APP.QUEUE", help=QUEUE_HELP)],
    app: Annotated[str, typer.Option("--app", help="The app whose grant is taken back.")],
    json_out: JsonOpt = False,
) -> None:
    """Take back what `allow` gave."""
    owner, queue = _split(target)
    call(client().delete, f"/v1/apps/{owner}/queues/{queue}/senders/{app}")
    if json_out:
        print_json({"app": owner, "queue": queue, "caller": app, "allowed": False})
        return
    console.print(f"app {app} may no longer send to {owner}.{queue}", markup=False)


FunctionOpt = Annotated[bool, typer.Option("--function", help="A function's DLQ (its async invocations').")]


def _dlq(target: str, function: bool) -> str:
    app, name = _split(target, "APP.FUNCTION" if function else "APP.QUEUE")
    return f"/v1/apps/{app}/dlq/{'function' if function else 'queue'}/{name}"


@dlq_app.command("ls")
def dlq_ls(app: Annotated[str, typer.Argument(metavar="APP")], json_out: JsonOpt = False) -> None:
    """The app's dead-letter queues that hold letters: its queues' and its functions'."""
    items = call(client().get, f"/v1/apps/{app}/dlq")["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["DLQ", "KIND", "LETTERS"], [[f"{d['app']}.{d['name']}", d["kind"], str(d["depth"])] for d in items]
    )


@dlq_app.command("show")
def dlq_show(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=DLQ_HELP)],
    function: FunctionOpt = False,
    limit: Annotated[int, typer.Option(help="How many, oldest first (at most 50).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """The oldest letters, with their error and tries (needs deploy on the app)."""
    items = call(client().get, _dlq(target, function), limit=limit)["items"]
    if json_out:
        print_json(items)
        return
    table(
        ["SEQ", "ID", "DIED", "TRIES", "ERROR"],
        [
            [
                str(d["seq"]),
                str(d.get("id", "")),
                when(d.get("died_at", 0)),
                str(d.get("attempts", "")),
                f"{(d.get('error') or {}).get('type', '')}: {(d.get('error') or {}).get('message', '')}"[:80],
            ]
            for d in items
        ],
    )


@dlq_app.command("redrive")
def dlq_redrive(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=DLQ_HELP)],
    function: FunctionOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Send the letters back: a queue's to the queue, a function's as new async invocations."""
    out = call(client().post, f"{_dlq(target, function)}/redrive", None)
    if json_out:
        print_json(out)
        return
    console.print(f"redrove {out['redriven']} letter(s) of {target}", markup=False)


@dlq_app.command("purge")
def dlq_purge(
    target: Annotated[str, typer.Argument(metavar="APP.NAME", help=DLQ_HELP)],
    function: FunctionOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Drop every letter of the dead-letter queue."""
    call(client().delete, _dlq(target, function))
    if json_out:
        print_json({"dlq": target, "purged": True})
        return
    console.print(f"purged the dead letters of {target}", markup=False)
