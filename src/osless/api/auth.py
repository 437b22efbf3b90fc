"""Bearer tokens: stored by their sha256, never in clear."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from fastapi import Depends, Request

from osless.api.errors import ApiError
from osless.api.models import now
from osless.api.resources import Resources
from osless.api.state import ApiState, get_state

__all__ = ["issue_token", "require_token", "token_digest"]


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
    info = await state.resources.get_token(token_digest(token.strip()))
    if info is None:
        raise ApiError(401, "unauthorized", "invalid token", headers={"www-authenticate": "Bearer"})
    return info
