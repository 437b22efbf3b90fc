"""Bearer tokens: stored by their sha256, never in clear."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from fastapi import Depends, Request

from osless.api.errors import ApiError
from osless.api.models import now
from osless.api.resources import Resources
from osless.api.state import ApiState, get_state

__all__ = ["issue_token", "require_role", "require_token", "token_digest"]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue_token(resources: Resources, name: str, role: str = "admin") -> str:
    token = "osl_" + secrets.token_urlsafe(32)
    await resources.put_token(token_digest(token), {"name": name, "role": role, "created_at": now()})
    return token


async def require_token(request: Request, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(the CLI reads it from `osless up`'s saved credentials or OSLESS_TOKEN)",
            headers={"www-authenticate": "Bearer"},
        )
    token = token.strip()
    app = state.secrets.app_of(token)
    if app is not None:
        _check_app_scope(request, app)
        return {"name": f"app:{app}", "role": "app", "app": app}
    info = await state.resources.get_token(token_digest(token))
    if info is None:
        raise ApiError(401, "unauthorized", "invalid token", headers={"www-authenticate": "Bearer"})
    request.state.caller = info
    return info


# What an app's own token opens: reading its own config (secrets masked) and endpoints.
_APP_SCOPE = re.compile(r"^/v1/(whoami|apps/(?P<app>[a-z0-9-]+)/(config|config/schema|endpoints))$")


def _check_app_scope(request: Request, app: str) -> None:
    match = _APP_SCOPE.match(request.url.path)
    if request.method != "GET" or match is None or match.group("app") not in (None, app):
        raise ApiError(
            403,
            "forbidden",
            f"this token belongs to app {app!r}: it can read {app!r}'s own "
            "config and endpoints, nothing else",
        )


def require_role(*roles: str) -> Any:
    """A dependency: the caller's token must have one of `roles`."""

    async def check(caller: dict[str, Any] = Depends(require_token)) -> dict[str, Any]:
        if caller.get("role") not in roles:
            raise ApiError(403, "forbidden", f"this needs a {' or '.join(roles)} token")
        return caller

    return Depends(check)
