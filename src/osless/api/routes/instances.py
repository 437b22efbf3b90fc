"""Instances (placed by the scheduler, run and reported on by node agents) and nodes."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from osless.api.auth import Caller, check_scope, require
from osless.api.errors import ApiError
from osless.api.models import Instance, InstanceStatus, Node, now
from osless.api.state import ApiState, get_state
from osless.api.watch import list_or_watch

router = APIRouter(tags=["instances"])


@router.get("/instances", summary="List instances (watch=true streams changes after `revision`)")
async def list_instances(
    app: str | None = None,
    node: str | None = None,
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    res = state.resources
    if caller.app is not None:
        check_scope(caller, app if app is not None else caller.app)
        app = caller.app

    def keep(ev: dict[str, Any]) -> bool:
        obj = ev["object"]
        # deletes carry no object: every watcher gets them and ignores unknown names
        return obj is None or ((app is None or obj["app"] == app) and (node is None or obj["node"] == node))

    return await list_or_watch(
        res,
        "instances",
        watch=watch,
        revision=revision,
        keep=keep,
        items=lambda: res.list_instances(app=app, node=node),
    )


@router.post("/instances", status_code=201, response_model=Instance)
async def create_instance(
    body: Instance, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> Instance:
    await state.resources.get_app(body.app)
    if not state.images.has_manifest(body.image):
        raise ApiError(
            422, "unknown_image", f"no image {body.image[:12]}… is stored here; deploy the app first"
        )
    return await state.resources.create_instance(body)


@router.get("/instances/{instance_id}", response_model=Instance)
async def get_instance(
    instance_id: str, state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> Instance:
    items, _ = await state.resources.list_instances()
    for i in items:
        if i.id == instance_id:
            check_scope(caller, i.app)
            return i
    raise ApiError(
        404, "instance_not_found", f"instance {instance_id!r} does not exist; `osless ps` lists them"
    )


@router.put("/instances/{instance_id}/status", response_model=Instance)
async def put_instance_status(
    instance_id: str,
    body: InstanceStatus,
    state: ApiState = Depends(get_state),
    caller: Caller = require("operate"),
) -> Instance:
    def change(i: Instance) -> Instance:
        i.status = body
        i.status.updated_at = now()
        return i

    return await state.resources.update_instance(instance_id, change)


@router.delete("/instances/{instance_id}", status_code=204)
async def delete_instance(
    instance_id: str, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> Response:
    if not await state.resources.delete_instance(instance_id):
        raise ApiError(404, "instance_not_found", f"instance {instance_id!r} does not exist")
    return Response(status_code=204)


@router.get("/nodes")
async def list_nodes(
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read"),
) -> Any:
    res = state.resources
    return await list_or_watch(res, "nodes", watch=watch, revision=revision, items=res.list_nodes)


@router.put("/nodes/{name}", response_model=Node, summary="Register a node or renew its lease (heartbeat)")
async def heartbeat_node(
    name: str, body: Node, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> Node:
    if body.name != name:
        raise ApiError(422, "name_mismatch", f"body names node {body.name!r} but the path names {name!r}")
    body.updated_at = now()
    return await state.resources.heartbeat_node(body)


class Calls(BaseModel):
    calls: list[dict[str, Any]] = Field(description='[{"caller": app, "callee": app, "count": n}, ...]')


@router.put("/nodes/{name}/calls", summary="Which apps called which through this node's egress proxy")
async def put_calls(
    name: str, body: Calls, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> dict[str, int]:
    await state.resources.store.put(f"/calls/{name}", json.dumps(body.calls).encode())
    return {"calls": len(body.calls)}
