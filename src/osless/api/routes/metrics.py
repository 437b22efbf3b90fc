"""`GET /metrics`: the API's Prometheus scrape (`api.metrics`), for a token that may read the platform."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from osless.api.auth import Caller, require
from osless.api.metrics import CONTENT_TYPE, scrape
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["system"])


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics of the platform (text format): instances, nodes, queues, the store",
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(
    state: ApiState = Depends(get_state),
    # Not for a token limited to one app: the figures are every app's.
    caller: Caller = require("read"),
) -> Response:
    return Response(await scrape(state), media_type=CONTENT_TYPE)
