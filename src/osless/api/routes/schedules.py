"""Schedules (api/schedules.py): listed (read), paused and resumed (deploy), their history (read),
and a tick fired by the controllers' leader (operate)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from osless.api import schedules
from osless.api.auth import Caller, require
from osless.api.broker import Broker
from osless.api.errors import ApiError, responses
from osless.api.state import ApiState, get_state
from osless.contracts import APP_NAME_PATTERN

router = APIRouter(tags=["schedules"])

AppName = Annotated[str, Path(pattern=APP_NAME_PATTERN)]
ScheduleName = Annotated[str, Path(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class Tick(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tick: int = Field(ge=0, le=2**40, description="the tick, in whole seconds since the epoch")


def _broker(state: ApiState) -> Broker:
    if state.broker is None:
        raise ApiError(503, "no_message_engine", "schedules need the message engine, not connected yet")
    return state.broker


@router.get("/schedules", summary="Every app's schedules, as their current releases declare them")
async def all_schedules(
    state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> dict[str, list[dict[str, Any]]]:
    items = await schedules.list_schedules(state)
    return {"items": [s for s in items if caller.sees(s["app"])]}


@router.get("/apps/{app}/schedules", responses=responses(404), summary="An app's schedules")
async def app_schedules(
    app: AppName, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, list[dict[str, Any]]]:
    return {"items": await schedules.list_schedules(state, app)}


@router.post(
    "/apps/{app}/schedules/{name}:pause",
    responses=responses(404),
    summary="Pause a schedule: no tick runs until it is resumed",
)
async def pause(
    app: AppName, name: ScheduleName, state: ApiState = Depends(get_state), caller: Caller = require("deploy")
) -> dict[str, Any]:
    return await schedules.set_paused(state, app, name, True, caller.name)


@router.post(
    "/apps/{app}/schedules/{name}:resume",
    responses=responses(404),
    summary="Resume a schedule: its next tick runs (those missed while paused do not)",
)
async def resume(
    app: AppName, name: ScheduleName, state: ApiState = Depends(get_state), caller: Caller = require("deploy")
) -> dict[str, Any]:
    return await schedules.set_paused(state, app, name, False, caller.name)


@router.get(
    "/apps/{app}/schedules/{name}/runs",
    responses=responses(404, 503),
    summary="A schedule's recent runs, newest first: tick, invocation, outcome and duration",
)
async def runs(
    app: AppName, name: ScheduleName, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, list[dict[str, Any]]]:
    return {"items": await schedules.history(state, _broker(state), app, name)}


@router.post(
    "/apps/{app}/schedules/{name}/ticks",
    responses=responses(400, 404, 409, 503),
    summary="Fire a tick (the controllers' leader does): its run, an async invocation, accepted once",
)
async def fire(
    body: Tick,
    app: AppName,
    name: ScheduleName,
    state: ApiState = Depends(get_state),
    caller: Caller = require("operate"),
) -> dict[str, Any]:
    return await schedules.fire(state, _broker(state), app, name, body.tick)
