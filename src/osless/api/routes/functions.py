"""Who may call an app's functions (grants, set by the callee's owner), and app-to-app calls.

An app calls another's function from its code (`osless.function("orders.quote").call(event)`):
the request leaves the sandbox through its node's egress proxy, which is one socket per app and so
knows which app speaks. The proxy asks here with its node's token (`egress`), naming the calling
app; the API believes a node only about the apps placed on it (as for their secrets), then
invokes as that app (`check_invoke`: the callee's grants decide). Nothing the app holds is a
credential for it: its own token (`OSLESS_TOKEN`) opens only its config.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel

from osless.api import grants
from osless.api.auth import Caller, check_invoke, check_node, require
from osless.api.errors import ApiError, responses
from osless.api.routes.config import placed_apps
from osless.api.routes.invoke import invoke
from osless.api.state import ApiState, get_state
from osless.contracts import APP_NAME_PATTERN

router = APIRouter(tags=["functions"])


class GrantView(BaseModel):
    app: str
    function: str
    caller: str
    by: str
    at: float


class GrantList(BaseModel):
    items: list[GrantView]


# A function's name, or `*` for every function of the app; the calling app's name.
GrantedFunction = Annotated[
    str, Path(pattern=r"^(\*|[A-Za-z_][A-Za-z0-9_]{0,63})$", description="a function's name, or * for all")
]
CallerApp = Annotated[str, Path(pattern=APP_NAME_PATTERN, max_length=40, description="the calling app")]


@router.put(
    "/apps/{app}/functions/{function}/callers/{caller}",
    response_model=GrantView,
    responses=responses(404),
    summary="Let the app `caller` call this function (`*`: every function of the app)",
)
async def allow_caller(
    app: str,
    function: GrantedFunction,
    caller: CallerApp,
    state: ApiState = Depends(get_state),
    who: Caller = require("deploy"),
) -> dict[str, Any]:
    await state.resources.get_app(app)
    grant = await grants.allow(state.resources.store, app, function, caller, who.name)
    return grant.model_dump()


@router.delete(
    "/apps/{app}/functions/{function}/callers/{caller}",
    status_code=204,
    responses=responses(404),
    summary="Take back what `allow` gave",
)
async def deny_caller(
    app: str,
    function: GrantedFunction,
    caller: CallerApp,
    state: ApiState = Depends(get_state),
    who: Caller = require("deploy"),
) -> Response:
    await state.resources.get_app(app)
    if not await grants.deny(state.resources.store, app, function, caller):
        raise ApiError(
            404,
            "grant_not_found",
            f"app {caller} has no grant on {app}.{function}; `osless functions grants {app}` lists them",
        )
    return Response(status_code=204)


@router.get(
    "/apps/{app}/callers",
    response_model=GrantList,
    responses=responses(404),
    summary="The apps allowed to call this app's functions",
)
async def list_callers(
    app: str, state: ApiState = Depends(get_state), who: Caller = require("read")
) -> dict[str, Any]:
    await state.resources.get_app(app)
    return {"items": [g.model_dump() for g in await grants.list_grants(state.resources.store, app)]}


@router.post(
    "/nodes/{node}/apps/{caller}/invoke/{app}/{function}",
    responses={
        200: {"description": "The function's result", "content": {"application/json": {"schema": {}}}},
        **responses(400, 404, 409, 413, 500, 502, 503, 504),
    },
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {"schema": {}}}}},
    summary="A node's egress proxy invokes a function for an app placed on that node, as that app",
)
async def invoke_as_app(
    node: str,
    caller: str,
    app: str,
    function: str,
    request: Request,
    state: ApiState = Depends(get_state),
    who: Caller = require("egress"),
) -> Response:
    check_node(who, node)
    if caller not in await placed_apps(state, node):
        # A node speaks only for the apps it runs: one taken over cannot borrow another's grants.
        raise ApiError(
            403,
            "not_placed",
            f"app {caller!r} has no instance on node {node!r}, which cannot speak for it",
        )
    as_app = Caller(id=f"app:{caller}", name=f"app:{caller}", role="app", app=caller)
    return await invoke(app, function, request, state, as_app)


class Access(BaseModel):
    allowed: bool
    caller: str


@router.get(
    "/apps/{app}/functions/{function}/access",
    response_model=Access,
    summary="Whether the caller may invoke this function: 200, or the 401/403 an invoke would get",
)
async def access(
    app: str, function: str, state: ApiState = Depends(get_state), who: Caller = require("invoke")
) -> dict[str, Any]:
    # The gateway's `/_functions/...` asks this for each token it sees (cached a second): the same
    # check as an invoke, made here, so the gateway holds no copy of the rules.
    await check_invoke(state.resources.store, who, app, function)
    return {"allowed": True, "caller": who.name}
