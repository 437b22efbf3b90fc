"""`POST /v1/dashboard/links`: a one-time sign-in link for the dashboard, for the caller's own token.

What `osless dashboard` and `osless up` print. The link carries a code good once, for
`session.CODE_TTL_S`, never the token: the code is redeemed at `/ui/link` for a session cookie. The
link's page says whose token it signs in with (name, role) before it is used: a link an app's page
offers may be its author's.
Audited like every write, so the log shows who opened a dashboard session this way.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from osless.api.auth import Caller, require
from osless.api.errors import ApiError, responses
from osless.api.state import ApiState, get_state
from osless.api.ui.session import CODE_TTL_S, MAX_CODES, MAX_CODES_PER_TOKEN, PEOPLE, TooManyCodes, make_code

__all__ = ["router"]

router = APIRouter(tags=["dashboard"])


class SignInLink(BaseModel):
    path: str = Field(description="open it on the API's address: /ui/link?code=...")
    expires_in_s: float


@router.post(
    "/dashboard/links",
    response_model=SignInLink,
    status_code=201,
    responses=responses(400, 403, 429),
    summary="A one-time dashboard sign-in link for this token (good once, for two minutes)",
)
async def make_link(
    request: Request, state: ApiState = Depends(get_state), caller: Caller = require("whoami", narrows=True)
) -> dict[str, object]:
    if caller.role not in PEOPLE:
        raise ApiError(403, "forbidden", f"a {caller.role} token opens no dashboard: use a person's token")
    # The guard authenticated this header's token: the session the code opens is that token's.
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    if not token:
        raise ApiError(400, "bad_request", "send the token as 'Authorization: Bearer <token>'")
    try:
        who = {"name": caller.name, "role": caller.role, "app": caller.app}
        code = await make_code(state.resources.store, state.secrets, token, who)
    except TooManyCodes:
        raise ApiError(
            429,
            "too_many_links",
            f"{MAX_CODES_PER_TOKEN} sign-in links of this token (or {MAX_CODES} in all) wait to be used: "
            "use one, or wait two minutes",
        ) from None
    return {"path": f"/ui/link?code={code}", "expires_in_s": CODE_TTL_S}
