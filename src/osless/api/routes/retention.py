"""Retention: how long deploys, releases, logs and image layers are kept, and a collection on demand."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from osless.api.auth import Caller, require
from osless.api.collector import Collection, Retention
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["retention"])


@router.get(
    "/retention", response_model=Retention, summary="How long deploys, releases, logs and layers are kept"
)
async def get_retention(state: ApiState = Depends(get_state), caller: Caller = require("read")) -> Retention:
    return await state.collector.retention()


@router.put(
    "/retention",
    response_model=Retention,
    summary="Set the retention (fields not given take their defaults); the next pass follows it",
)
async def put_retention(
    body: Retention, state: ApiState = Depends(get_state), caller: Caller = require("admin")
) -> Retention:
    return await state.collector.set_retention(body)


@router.post(
    "/retention/collect",
    response_model=Collection,
    summary="Collect now what the retention no longer keeps; answers what was deleted",
)
async def collect(state: ApiState = Depends(get_state), caller: Caller = require("admin")) -> Collection:
    return await state.collector.collect()
