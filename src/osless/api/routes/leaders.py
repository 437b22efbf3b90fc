"""Leaders: which controller process acts, elected on a store lease (as Kubernetes' leases on etcd).

Every candidate asks `PUT /v1/leaders/{name}` every third of its ttl; the first one gets the lease
and keeps it while it renews; the others get 409 naming the holder, and take over once its lease
has run out (the holder died, or cannot reach the API). A term is bound to the token that took it:
another token cannot renew it or step it down (but an admin's), whatever holder it names.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Response

from osless.api.auth import Caller, Permission, require
from osless.api.errors import ApiError, responses
from osless.api.models import ID_PATTERN, Leader, LeaderClaim
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["leaders"])

# Who may campaign: the platform's control loop. One line to change once controllers get a role.
CAMPAIGN: Permission = "operate"
LEADER_HIDDEN = {"token"}  # which token holds it is the API's to check, not anyone's to read


@router.get(
    "/leaders/{name}", response_model=Leader, response_model_exclude=LEADER_HIDDEN, responses=responses(404)
)
async def get_leader(
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read"),
) -> Leader:
    leader = await state.resources.get_leader(name)
    if leader is None:
        raise ApiError(404, "no_leader", f"nobody holds {name!r} now")
    return leader


@router.put(
    "/leaders/{name}",
    response_model=Leader,
    response_model_exclude=LEADER_HIDDEN,
    responses=responses(409),
    summary="Take the leadership if it is free, or renew it if it is the holder's",
)
async def claim_leader(
    body: LeaderClaim,
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require(CAMPAIGN),
) -> Any:
    return await state.resources.claim_leader(name, body.holder, body.ttl_s, caller.id)


@router.delete(
    "/leaders/{name}", status_code=204, responses=responses(409), summary="Step down (the holder only)"
)
async def release_leader(
    name: str = Path(pattern=ID_PATTERN),
    holder: str = Query(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require(CAMPAIGN),
) -> Response:
    # An admin may end any term (an operator moving the leadership); a controller only its own.
    await state.resources.release_leader(name, holder, caller.id, any_token=caller.role == "admin")
    return Response(status_code=204)
