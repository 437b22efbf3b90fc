"""Whole-platform views: status, and who the caller is."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends

from osless import __version__
from osless.api.auth import require_token
from osless.api.models import StatusView, WhoAmI
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["system"])
STARTED = time.time()


@router.get("/whoami", response_model=WhoAmI)
async def whoami(token: dict[str, Any] = Depends(require_token)) -> dict[str, Any]:
    return {"name": token.get("name"), "role": token.get("role")}


@router.get("/status", response_model=StatusView)
async def status(state: ApiState = Depends(get_state)) -> dict[str, Any]:
    res = state.resources
    apps, rev = await res.list_apps()
    instances, _ = await res.list_instances()
    nodes, _ = await res.list_nodes()
    phases = Counter(i.status.phase for i in instances)
    return {
        "version": __version__,
        "revision": rev,
        "uptime_s": round(time.time() - STARTED, 1),
        "gateway": state.gateway_url,
        "apps": len(apps),
        "instances": dict(phases),
        "nodes": [n.name for n in nodes],
        "builds_running": len(state.builds),
    }
