"""An app's logs: the last lines of every instance, merged by time, optionally followed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from osless.api.auth import Caller, require
from osless.api.errors import responses
from osless.api.models import InstanceId
from osless.api.openapi import LOG
from osless.api.state import ApiState, get_state
from osless.logs import follow, read_tail

router = APIRouter(tags=["logs"])


@router.get(
    "/apps/{app}/logs",
    response_class=StreamingResponse,
    responses={**LOG, **responses(404)},
    summary="NDJSON log records of the app's instances; follow=true streams",
)
async def app_logs(
    app: str,
    tail: int = Query(default=100, ge=0, le=100_000),
    follow_: bool = Query(default=False, alias="follow"),
    instance: InstanceId | None = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("logs"),
) -> Any:
    await state.resources.get_app(app)
    folder = state.app_log_dir(app)

    def paths() -> list[Path]:
        if instance:
            return [folder / f"{instance}.log"]
        return sorted(folder.glob("*.log")) if folder.exists() else []

    async def stream() -> AsyncIterator[bytes]:
        if follow_:
            async for rec in follow(paths, tail=tail, poll_s=0.1):
                yield (json.dumps(rec) + "\n").encode()
        else:
            for rec in read_tail(paths(), tail):
                yield (json.dumps(rec) + "\n").encode()

    return StreamingResponse(stream(), media_type="application/x-ndjson")
