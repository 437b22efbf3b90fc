"""The audit log: who wrote what, when, from where (api/audit.py keeps it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from osless.api import audit
from osless.api.auth import Caller, require
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["audit"])


class AuditList(BaseModel):
    items: list[audit.AuditEntry]


@router.get(
    "/audit",
    response_model=AuditList,
    summary="Writes to the API, newest first: who, what, when, from where, and the answer",
)
async def list_audit(
    app: str | None = Query(default=None, max_length=64, description="only writes to this app"),
    since: float | None = Query(default=None, ge=0, description="only after this time (epoch seconds)"),
    limit: int = Query(default=100, ge=1, le=audit.MAX_ENTRIES),
    state: ApiState = Depends(get_state),
    caller: Caller = require("admin"),
) -> dict[str, Any]:
    return {"items": await audit.query(state.resources.store, app=app, since=since, limit=limit)}
