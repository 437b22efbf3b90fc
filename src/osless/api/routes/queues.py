"""Queues (api/queues.py): send, stats, peek; who may send (grants); the dead-letter queues.

A queue exists while the app's current release consumes it (`@app.on_message`). Sending takes the
`invoke` permission (a token limited to an app sends to that app's queues; one limited to
functions sends nowhere), or, for an app from its code (through its node's egress proxy, as
`osless.function` calls), the queue being its own or granted (`osless queue allow`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from osless.api import grants, invocations, queues, wakes
from osless.api.auth import Caller, check_node, check_scope, require
from osless.api.broker import Broker
from osless.api.errors import ApiError, responses
from osless.api.routes.config import placed_apps
from osless.api.state import ApiState, get_state
from osless.contracts import APP_NAME_PATTERN, QUEUE_NAME_PATTERN, ConsumerManifest

router = APIRouter(tags=["queues"])

AppName = Annotated[str, Path(pattern=APP_NAME_PATTERN, max_length=40)]
QueueName = Annotated[str, Path(pattern=QUEUE_NAME_PATTERN, description="a queue of the app")]
Kind = Annotated[str, Path(pattern="^(queue|function)$", description="queue or function")]
DeadName = Annotated[str, Path(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")]
MAX_SEND = 100
MAX_REDRIVE = 1000
PAGE = 50  # letters read at once (each up to the engine's 1 MiB a message)


def _broker(state: ApiState) -> Broker:
    if state.broker is None:
        raise ApiError(503, "no_message_engine", "queues need the message engine, not connected yet")
    return state.broker


# (app, uid, release) -> its queues: a release never changes, and a send need not parse its manifest
# (the uid, never reused, tells a new app of the name from a deleted one). Bounded: cleared whole
# when full, and refilled from the store as sends come.
_RELEASE_QUEUES: dict[tuple[str, int, int], dict[str, ConsumerManifest]] = {}
MAX_CACHED_RELEASES = 1024


async def app_queues(state: ApiState, app: str) -> dict[str, ConsumerManifest]:
    """The queues of the app's current release, by name."""
    a = await state.resources.get_app(app)
    if a.current_release is None:
        return {}
    key = (app, a.uid if a.uid is not None else -1, a.current_release)
    found = _RELEASE_QUEUES.get(key) if a.uid is not None else None
    if found is None:
        manifest = (await state.resources.get_release(app, a.current_release)).manifest
        found = {c.queue: c for c in manifest.consumers.values()}
        if len(_RELEASE_QUEUES) >= MAX_CACHED_RELEASES:
            _RELEASE_QUEUES.clear()
        _RELEASE_QUEUES[key] = found
    return found


async def find_queue(state: ApiState, app: str, queue: str) -> ConsumerManifest:
    found = await app_queues(state, app)
    if queue not in found:
        names = ", ".join(sorted(found)) or "none"
        raise ApiError(
            404,
            "unknown_queue",
            f"app {app!r} has no queue {queue!r} (it has: {names}); a queue is declared by "
            "@app.on_message in the app's current release",
        )
    return found[queue]


async def _send(state: ApiState, app: str, queue: str, request: Request) -> dict[str, Any]:
    await find_queue(state, app, queue)
    try:
        given = json.loads((await request.body()).decode())
        items = given["messages"]
        if not isinstance(items, list) or not all(isinstance(m, dict) and "body" in m for m in items):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ApiError(
            400,
            "bad_messages",
            'send {"messages": [{"body": ANY_JSON}, ...]} (JSON in UTF-8)',
        ) from e
    if not 0 < len(items) <= MAX_SEND:
        raise ApiError(400, "bad_messages", f"send 1 to {MAX_SEND} messages at once, not {len(items)}")
    bodies = [queues.check_body(m["body"]) for m in items]
    wakes.wake_soon(state, app, "a message arrived while at zero")
    ids = await queues.send(_broker(state), app, queue, bodies)
    return {"app": app, "queue": queue, "ids": ids}


@router.post(
    "/queues/{app}/{queue}/messages",
    status_code=202,
    responses=responses(400, 403, 404, 413, 429, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    summary='Send messages to a queue: `{"messages": [{"body": ...}]}` (1-100); their ids, once durable',
)
async def send_messages(
    app: AppName,
    queue: QueueName,
    request: Request,
    state: ApiState = Depends(get_state),
    caller: Caller = require("invoke"),
) -> dict[str, Any]:
    check_scope(caller, app)
    if caller.functions is not None:
        raise ApiError(
            403,
            "not_allowed",
            f"token {caller.name!r} is limited to functions and may not send to queues; use a token "
            f"of role invoke or deploy (limited to the app with --app {app} if you like)",
        )
    return await _send(state, app, queue, request)


@router.post(
    "/nodes/{node}/apps/{caller}/queues/{app}/{queue}/messages",
    status_code=202,
    responses=responses(400, 403, 404, 413, 429, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    summary="A node's egress proxy sends to a queue for an app placed on that node, as that app",
)
async def send_as_app(
    node: str,
    caller: AppName,
    app: AppName,
    queue: QueueName,
    request: Request,
    state: ApiState = Depends(get_state),
    who: Caller = require("egress"),
) -> dict[str, Any]:
    check_node(who, node)
    if caller not in await placed_apps(state, node):
        raise ApiError(
            403, "not_placed", f"app {caller!r} has no instance on node {node!r}, which cannot speak for it"
        )
    if caller != app and not await grants.may_send(state.resources.store, app, queue, caller):
        raise ApiError(
            403,
            "not_allowed",
            f"app {caller} may not send to queue {app}.{queue}; grant it with "
            f"`osless queue allow {app}.{queue} --app {caller}`",
        )
    return await _send(state, app, queue, request)


@router.get(
    "/queues", responses=responses(503), summary="Every queue (or an app's) with its depth and DLQ depth"
)
async def list_queues(
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
    app: Annotated[str | None, Query(pattern=APP_NAME_PATTERN)] = None,
) -> dict[str, list[dict[str, Any]]]:
    broker = _broker(state)
    names = [app] if app is not None else [a.name for a in (await state.resources.list_apps())[0]]
    out = []
    for name in names:
        if not caller.sees(name):
            continue
        for spec in (await app_queues(state, name)).values():
            out.append(await queues.stats(broker, name, spec))
    return {"items": out}


@router.get(
    "/queues/{app}/{queue}", responses=responses(404, 503), summary="A queue's depth, age, in flight, DLQ"
)
async def queue_stats(
    app: AppName, queue: QueueName, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, Any]:
    return await queues.stats(_broker(state), app, await find_queue(state, app, queue))


@router.get(
    "/queues/{app}/{queue}/messages",
    responses=responses(404, 503),
    summary="The oldest messages of a queue, without taking them (their bodies: `deploy` permission)",
)
async def peek_messages(
    app: AppName,
    queue: QueueName,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
    limit: Annotated[int, Query(ge=1, le=queues.MAX_PEEK)] = 10,
) -> dict[str, list[dict[str, Any]]]:
    await find_queue(state, app, queue)
    return {"items": await queues.peek(_broker(state), app, queue, limit)}


@router.put(
    "/apps/{app}/queues/{queue}/senders/{caller}",
    responses=responses(404, 409),
    summary="Let the app `caller` send to this queue from its code",
)
async def allow_sender(
    app: AppName,
    queue: QueueName,
    caller: AppName,
    state: ApiState = Depends(get_state),
    who: Caller = require("deploy"),
) -> dict[str, Any]:
    await state.resources.get_app(app)
    grant = await grants.allow(state.resources.store, app, grants.queue_grant(queue), caller, who.name)
    return grant.model_dump()


@router.delete(
    "/apps/{app}/queues/{queue}/senders/{caller}",
    status_code=204,
    responses=responses(404),
    summary="Take back what `allow` gave",
)
async def deny_sender(
    app: AppName,
    queue: QueueName,
    caller: AppName,
    state: ApiState = Depends(get_state),
    who: Caller = require("deploy"),
) -> Response:
    await state.resources.get_app(app)
    if not await grants.deny(state.resources.store, app, grants.queue_grant(queue), caller):
        raise ApiError(404, "grant_not_found", f"app {caller} has no grant on queue {app}.{queue}")
    return Response(status_code=204)


@router.get(
    "/apps/{app}/dlq", responses=responses(404, 503), summary="The app's dead-letter queues that hold letters"
)
async def list_dead_letter_queues(
    app: AppName, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, list[dict[str, Any]]]:
    await state.resources.get_app(app)
    counts = await queues.dead_letter_counts(_broker(state), app)
    items = [{"app": app, "kind": k, "name": n, "depth": d} for (k, n), d in sorted(counts.items())]
    return {"items": items}


@router.get(
    "/apps/{app}/dlq/{kind}/{name}",
    responses=responses(404, 503),
    summary="The oldest letters of a dead-letter queue, with their errors (`deploy`: they hold data)",
)
async def show_dead_letters(
    app: AppName,
    kind: Kind,
    name: DeadName,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
    limit: Annotated[int, Query(ge=1, le=PAGE)] = 20,
) -> dict[str, list[dict[str, Any]]]:
    await state.resources.get_app(app)
    return {"items": await queues.dead_letters(_broker(state), app, name, kind, limit)}


@router.post(
    "/apps/{app}/dlq/{kind}/{name}/redrive",
    responses=responses(404, 503),
    summary="Send the letters back (a queue's to the queue, a function's as async invocations)",
)
async def redrive(
    app: AppName,
    kind: Kind,
    name: DeadName,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
    limit: Annotated[int, Query(ge=1, le=MAX_REDRIVE)] = MAX_REDRIVE,
) -> dict[str, Any]:
    broker = _broker(state)
    if kind == "queue":
        await find_queue(state, app, name)
    else:
        await state.resources.get_app(app)
    moved = 0
    upto = await queues.last_letter(broker)  # not those that die again meanwhile: they wait for the next
    while moved < limit:  # a page at a time: a letter may be 256 KiB and more
        letters = await queues.dead_letters(broker, app, name, kind, min(PAGE, limit - moved))
        letters = [letter for letter in letters if int(letter["seq"]) <= upto]
        if not letters:
            break
        for letter in letters:
            if kind == "queue":
                await queues.send(broker, app, name, [invocations.encode(letter.get("body"))])
            else:
                event = str(letter.get("event", "null")).encode()
                await invocations.submit(broker, app, name, event, None)
            await queues.take_letter(broker, int(letter["seq"]))  # after the copy is durable: never lost
            moved += 1
    return {"app": app, "kind": kind, "name": name, "redriven": moved}


@router.delete(
    "/apps/{app}/dlq/{kind}/{name}",
    status_code=204,
    responses=responses(404, 503),
    summary="Drop every letter of a dead-letter queue",
)
async def purge(
    app: AppName,
    kind: Kind,
    name: DeadName,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Response:
    await state.resources.get_app(app)
    await queues.purge_dead(_broker(state), app, name, kind)
    return Response(status_code=204)
