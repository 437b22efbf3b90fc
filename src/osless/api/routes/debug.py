"""Remote debugging without SSH (issue 14): an instance's Python stacks and a sampling profile.

The API finds the node running the instance and asks its node API (`node.debug`: py-spy against the
instance's host pid, from outside, the app cooperating in nothing), showing the node a token made
for that node and app alone (`debugger` role, a minute: `secrets.scoped_token`), never the
caller's. Both routes need the `debug` permission (the `debug` and `admin` roles) and are POSTs, so
the guard records each in the audit log: who, which app, which instance (`?instance=`), what.
A node takes at most one profile of an instance at a time (409 past it) and 8 stacks or profiles at
once (429 past it); seconds are 1 to 60; one stack call reads at most 32 instances.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from osless.api.auth import Caller, require
from osless.api.errors import ApiError, responses
from osless.api.state import ApiState, get_state
from osless.bounds import cap
from osless.contracts import ID_PATTERN, Instance, Node

router = APIRouter(tags=["debug"])

TOKEN_TTL_S = 60.0  # the node checks it when the request comes, not when a profile ends
NODE_CONNECT_S = 3.0
STACK_WAIT_S = 30.0  # the node kills a dump past 20 s
PROFILE_SLACK_S = 30.0  # past the profile's seconds: the node kills py-spy 20 s past them
MAX_SECONDS = 60
MAX_STACKS = 32  # instances read by one stack call: an app of hundreds is read a part at a time
# What a node's answer may hold: its own cap on py-spy's output (16 MB), and a little more.
MAX_NODE_ANSWER = 17 * 1024 * 1024
InstanceQuery = Annotated[
    str | None, Query(pattern=ID_PATTERN, description="One instance; all the app's running ones if unset")
]


def _shown(state: ApiState, app: str, node: str) -> dict[str, str]:
    token = state.secrets.scoped_token("debugger", app, TOKEN_TTL_S, node)
    return {"authorization": f"Bearer {token}"}


async def _targets(state: ApiState, app: str, instance: str | None) -> list[tuple[Instance, Node]]:
    """The app's running instances (or the one named), each with the live node that runs it."""
    await state.resources.get_app(app)  # 404 for an unknown app
    items, _ = await state.resources.list_instances(app=app)
    if instance is not None:
        items = [i for i in items if i.id == instance]
        if not items:
            raise ApiError(
                404,
                "instance_not_found",
                f"app {app} has no instance {instance}: `osless instances` lists them",
            )
    nodes = {n.name: n for n in (await state.resources.list_nodes())[0]}
    running = [(i, nodes[i.node]) for i in items if i.status.phase == "ready" and i.node in nodes]
    if not running:
        which = f"instance {instance}" if instance else f"app {app} has no instance that"
        raise ApiError(
            409, "not_running", f"{which} is not running now; `osless scale {app} --min 1` keeps one up"
        )
    return running


async def _ask(node: Node, path: str, headers: dict[str, str], wait_s: float) -> httpx.Response:
    """The node's answer, read whole up to MAX_NODE_ANSWER; its refusal said as the API's own error."""
    if not node.api:
        raise ApiError(503, "node_unavailable", f"node {node.name} has no node API to ask")
    timeout = httpx.Timeout(wait_s, connect=NODE_CONNECT_S)
    try:
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream("POST", node.api.rstrip("/") + path, headers=headers) as resp,
        ):
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_NODE_ANSWER:
                    raise ApiError(503, "node_unavailable", f"node {node.name} sent too large an answer")
    except httpx.HTTPError as e:
        raise ApiError(503, "node_unavailable", f"node {node.name} could not be asked: {e}") from None
    if resp.status_code != 200:
        try:
            err = json.loads(body)["error"]
            code, message = cap(str(err["code"]), 64), cap(str(err["message"]), 1000)
        except (ValueError, KeyError, TypeError):
            code, message = "node_error", f"it answered {resp.status_code}"
        status = resp.status_code if resp.status_code in (400, 404, 409, 429) else 503
        raise ApiError(status, code, f"node {node.name}: {message}")
    return httpx.Response(
        200, content=bytes(body), headers={"content-type": resp.headers.get("content-type", "")}
    )


@router.post(
    "/apps/{app}/debug/stack",
    responses=responses(403, 404, 409, 429, 503),
    summary="Every thread's Python stack of an app's running instances (py-spy dump)",
)
async def stack(
    app: str,
    instance: InstanceQuery = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("debug"),
) -> dict[str, Any]:
    targets = await _targets(state, app, instance)
    more = len(targets) > MAX_STACKS

    async def one(inst: Instance, node: Node) -> dict[str, Any]:
        path = f"/debug/apps/{app}/instances/{inst.id}/stack"
        try:
            resp = await _ask(node, path, _shown(state, app, node.name), STACK_WAIT_S)
            threads = resp.json()["threads"]
        except ApiError as e:
            if instance is not None:
                raise
            return {"instance": inst.id, "node": node.name, "threads": [], "error": e.message}
        except (ValueError, KeyError, TypeError):
            raise ApiError(503, "node_unavailable", f"node {node.name}'s answer was not a stack") from None
        return {"instance": inst.id, "node": node.name, "threads": threads, "error": None}

    items = await asyncio.gather(*(one(i, n) for i, n in targets[:MAX_STACKS]))
    return {"items": list(items), "truncated": more}


@router.post(
    "/apps/{app}/debug/profile",
    responses=responses(400, 403, 404, 409, 429, 503),
    summary="A sampling profile of a running instance as a flame graph (py-spy record)",
    response_class=Response,
)
async def profile(
    app: str,
    instance: InstanceQuery = None,
    seconds: Annotated[int, Query(ge=1, le=MAX_SECONDS, description="How long to sample")] = 10,
    format: Annotated[Literal["svg", "speedscope"], Query(description="svg or speedscope JSON")] = "svg",
    state: ApiState = Depends(get_state),
    caller: Caller = require("debug"),
) -> Response:
    targets = await _targets(state, app, instance)
    if len(targets) > 1:
        ids = ", ".join(i.id for i, _ in targets[:20])
        raise ApiError(
            400,
            "instance_required",
            f"app {app} runs {len(targets)} instances ({ids}): name one with ?instance=",
        )
    inst, node = targets[0]
    path = f"/debug/apps/{app}/instances/{inst.id}/profile?seconds={seconds}&format={format}"
    resp = await _ask(node, path, _shown(state, app, node.name), seconds + PROFILE_SLACK_S)
    media = "image/svg+xml" if format == "svg" else "application/json"
    return Response(resp.content, media_type=media, headers={"x-osless-instance": inst.id})
