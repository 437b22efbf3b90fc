"""Instances (placed by the scheduler, run and reported on by node agents) and nodes."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from osless.api.auth import GATEWAY_PREFIX, Caller, check_node, check_scope, node_of, require
from osless.api.errors import ApiError, responses
from osless.api.models import (
    ID_PATTERN,
    CallsReceived,
    CallsReport,
    Instance,
    InstanceList,
    InstanceStatus,
    Node,
    NodeLease,
    NodeList,
    now,
)
from osless.api.nodeaddr import tie_to_client
from osless.api.openapi import WATCHABLE
from osless.api.state import ApiState, get_state
from osless.api.watch import list_or_watch

router = APIRouter(tags=["instances"])


class GatewayToken(BaseModel):
    name: str
    token: str = Field(description="the token itself: shown this once, never again")


@router.get(
    "/instances",
    response_model=InstanceList,
    responses={**WATCHABLE, **responses(400)},
    summary="List instances (watch=true streams changes after `revision`)",
)
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


@router.post("/instances", status_code=201, response_model=Instance, responses=responses(404, 409))
async def create_instance(
    body: Instance, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> Instance:
    await state.resources.get_app(body.app)
    if not state.images.has_manifest(body.image):
        raise ApiError(
            404, "image_not_found", f"no image {body.image[:12]}… is stored here; deploy the app first"
        )
    # An instance runs as its app (uid, config, secrets, volumes): only an image that app released.
    return await state.resources.create_instance(body)


@router.get("/instances/{instance_id}", response_model=Instance, responses=responses(404))
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


@router.put("/instances/{instance_id}/status", response_model=Instance, responses=responses(404, 409))
async def put_instance_status(
    instance_id: str,
    body: InstanceStatus,
    state: ApiState = Depends(get_state),
    caller: Caller = require("report"),
) -> Instance:
    # A node token speaks for the node it was made for; one named otherwise, for none.
    node = (node_of(caller) or "") if caller.role == "node" else None

    def change(i: Instance) -> Instance:
        if node is not None and i.node != node:
            # Fencing: a node cut off long enough to be replaced must not write over the new state.
            raise ApiError(
                409,
                "not_this_node",
                f"instance {instance_id!r} is assigned to node {i.node!r}, not to {node!r}: "
                "a node reports only on its own instances (list them with ?node=)",
            )
        i.status = body
        i.status.updated_at = now()
        return i

    return await state.resources.update_instance(instance_id, change)


@router.delete("/instances/{instance_id}", status_code=204, responses=responses(404))
async def delete_instance(
    instance_id: str, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> Response:
    if not await state.resources.delete_instance(instance_id):
        raise ApiError(404, "instance_not_found", f"instance {instance_id!r} does not exist")
    return Response(status_code=204)


@router.get("/nodes", response_model=NodeList, responses={**WATCHABLE, **responses(400)})
async def list_nodes(
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read"),
) -> Any:
    res = state.resources
    return await list_or_watch(res, "nodes", watch=watch, revision=revision, items=res.list_nodes)


@router.put(
    "/nodes/{name}",
    response_model=Node,
    responses=responses(400, 403),
    summary="Register a node or renew its lease (heartbeat); its URLs must be on the address it calls from",
)
async def heartbeat_node(
    body: NodeLease,
    request: Request,
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("report"),
) -> Node:
    check_node(caller, name)
    lease = tie_to_client(body, request.client.host if request.client else None)
    return await state.resources.heartbeat_node(Node(name=name, updated_at=now(), **lease.model_dump()))


@router.put(
    "/nodes/{name}/calls",
    response_model=CallsReceived,
    summary="Which apps called which through this node's egress proxy",
)
async def put_calls(
    name: str, body: CallsReport, state: ApiState = Depends(get_state), caller: Caller = require("report")
) -> dict[str, int]:
    check_node(caller, name)
    await state.resources.store.put(f"/calls/{name}", json.dumps(body.calls).encode())
    return {"calls": len(body.calls)}


@router.post(
    "/nodes/{name}/gateway-token",
    status_code=201,
    response_model=GatewayToken,
    responses=responses(403),
    summary="A token for this node's gateway processes (routing reads, wakes, traffic; no secrets)",
)
async def gateway_token(
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("report"),
) -> dict[str, str]:
    # A node hands its gateways this rather than its own token, which reads secrets. One per node:
    # the one made at the node's previous start is revoked.
    check_node(caller, name)
    token_name = GATEWAY_PREFIX + name
    for digest, record in await state.tokens.list():
        if record.role == "gateway" and record.name == token_name:
            await state.tokens.revoke(digest)
    token, _, _ = await state.tokens.issue(token_name, "gateway")
    return {"name": token_name, "token": token}
