"""Async invocations' states (api/invocations.py): one by id, and an app's recent ones.

Whoever may invoke a function may read its invocations (their results are the function's answers):
the same checks as the invoke itself (`check_invoke`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from osless.api import invocations
from osless.api.auth import Caller, check_invoke, check_scope, require
from osless.api.broker import Broker
from osless.api.errors import ApiError, responses
from osless.api.state import ApiState, get_state
from osless.contracts import APP_NAME_PATTERN

router = APIRouter(tags=["invocations"])


def _broker(state: ApiState) -> Broker:
    if state.broker is None:
        raise ApiError(
            503, "no_message_engine", "async invocations need the message engine, not connected yet"
        )
    return state.broker


@router.get(
    "/invocations/{invocation_id}",
    responses=responses(404, 503),
    summary="An async invocation: its state, attempts, and its result or error",
)
async def get_invocation(
    invocation_id: str,
    state: ApiState = Depends(get_state),
    caller: Caller = require("invoke", narrows=True),
) -> dict[str, Any]:
    found = await invocations.get_invocation(_broker(state), invocation_id[:300])
    check_scope(caller, found["app"])
    await check_invoke(state.resources.store, caller, found["app"], found["function"])
    return found


@router.get(
    "/apps/{app}/invocations",
    responses=responses(503),
    summary="The app's async invocations of the last 24 h, newest first",
)
async def list_invocations(
    app: Annotated[str, Path(pattern=APP_NAME_PATTERN)],
    state: ApiState = Depends(get_state),
    caller: Caller = require("invoke"),
    state_is: Annotated[
        str | None, Query(alias="state", pattern="^(queued|running|succeeded|failed|dead)$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, list[dict[str, Any]]]:
    items = await invocations.list_invocations(_broker(state), app, state_is, limit)
    shown = []
    for item in items:
        try:
            await check_invoke(state.resources.store, caller, app, item["function"])
        except ApiError:
            continue  # a token limited to some functions sees their invocations only
        shown.append(item)
    return {"items": shown}
