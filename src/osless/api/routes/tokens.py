"""Tokens: made with a role (and optionally one app and an expiry), listed without their secret, revoked."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from osless.api.auth import (
    FUNCTION_GRANT_PATTERN,
    ID_LEN,
    MAX_FUNCTION_GRANTS,
    NAME_PATTERN,
    NODE_PREFIX,
    Caller,
    Grantable,
    TokenRecord,
    require,
)
from osless.api.errors import ApiError, responses
from osless.api.models import AppName, Body, now
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["tokens"])

MAX_LIFETIME_S = 10 * 365 * 86400


class CreateToken(Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Grantable
    app: AppName | None = Field(default=None, description="limit the token to this app (not admin)")
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="default: the role (and app)")
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S, description="default: never")
    functions: list[Annotated[str, StringConstraints(pattern=FUNCTION_GRANT_PATTERN)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FUNCTION_GRANTS,
        description="an invoke token: the only functions it may invoke, as APP.FUNCTION or APP.* "
        "(default: any, of its app if it has one)",
    )


class TokenView(BaseModel):
    id: str
    name: str
    role: str
    app: str | None
    created_at: float
    expires_at: float | None
    expired: bool
    last_used_at: float | None
    functions: list[str] | None = None


class NewToken(TokenView):
    token: str = Field(description="the token itself: shown this once, never again")


class TokenList(BaseModel):
    items: list[TokenView]


def _view(digest: str, record: TokenRecord, last_used: float | None = None) -> dict[str, Any]:
    return {
        "id": digest[:ID_LEN],
        "name": record.name,
        "role": record.role,
        "app": record.app,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "expired": record.expired(),
        "last_used_at": max(filter(None, (last_used, record.last_used_at)), default=None),
        "functions": record.functions,
    }


@router.post(
    "/tokens",
    status_code=201,
    response_model=NewToken,
    summary="Make a token; the answer is the only time it is shown",
)
async def create_token(
    body: CreateToken, state: ApiState = Depends(get_state), caller: Caller = require("admin")
) -> dict[str, Any]:
    if body.app is not None and body.role == "admin":
        raise ApiError(
            422,
            "invalid_request",
            "an admin token cannot be limited to one app; use deploy, read, debug or invoke",
        )
    if body.role in ("node", "controller", "builder") and body.app is not None:
        raise ApiError(
            422,
            "invalid_request",
            f"a {body.role} token serves every app: it cannot be limited to one (drop --app)",
        )
    if body.functions is not None:
        if body.role != "invoke":
            raise ApiError(
                422,
                "invalid_request",
                f"only an invoke token can be limited to functions, not a {body.role} one "
                "(`osless tokens create --role invoke --functions APP.FUNCTION`)",
            )
        if body.app is not None and (other := [f for f in body.functions if f.split(".")[0] != body.app]):
            raise ApiError(
                422,
                "invalid_request",
                f"this token is limited to app {body.app!r}: it could never invoke {', '.join(other)} "
                "(drop --app, or name functions of that app)",
            )
    name = body.name or (f"{body.role}-{body.app}" if body.app else body.role)
    if body.role == "node" and not name.startswith(NODE_PREFIX):
        # The node it acts for, which `check_node` reads there (without a name: a node named "node").
        name = NODE_PREFIX + name
    expires_at = None if body.expires_in_s is None else round(now() + body.expires_in_s, 3)
    token, digest, record = await state.tokens.issue(
        name,
        body.role,
        app=body.app,
        expires_at=expires_at,
        functions=None if body.functions is None else sorted(set(body.functions)),
    )
    return {**_view(digest, record), "token": token}


@router.get(
    "/tokens",
    response_model=TokenList,
    summary="Every token (never the token itself): role, app, expiry, last use",
)
async def list_tokens(
    state: ApiState = Depends(get_state), caller: Caller = require("admin")
) -> dict[str, Any]:
    found = await state.tokens.list()
    items = [_view(d, r, state.tokens.last_used(d)) for d, r in found]
    items.sort(key=lambda t: t["created_at"])
    return {"items": items}


@router.delete(
    "/tokens/{token_id}",
    status_code=204,
    responses=responses(404, 409),
    summary="Revoke a token: it stops working at once",
)
async def revoke_token(
    token_id: str,
    force: bool = Query(default=False, description="revoke a node's token too (its node stops at once)"),
    state: ApiState = Depends(get_state),
    caller: Caller = require("admin"),
) -> Response:
    found = await state.tokens.find(token_id)
    if found is None:
        raise ApiError(
            404, "token_not_found", f"no token with id {token_id!r}; `osless tokens ls` lists them"
        )
    digest, record = found
    if digest[:ID_LEN] == caller.id:
        raise ApiError(
            409,
            "own_token",
            "this is the token this request is made with: revoke it with another admin token "
            "(`osless tokens create --role admin` makes one)",
        )
    if record.role == "node" and not force:
        # A node that lost its token stops heartbeating: its lease runs out and its instances are
        # replaced elsewhere. Meant for a machine lost or stolen, so asked for explicitly.
        raise ApiError(
            409,
            "node_token",
            "this is a node agent's token: its node stops working at once (its instances move to other "
            "nodes); pass force=true (`osless tokens revoke ID --force`) if that is what you want",
        )
    await state.tokens.revoke(digest)
    return Response(status_code=204)
