"""Whole-platform views: status, and who the caller is."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends

from osless import __version__
from osless.api.auth import ROLES, Caller, require
from osless.api.models import StatusView, WhoAmI
from osless.api.state import ApiState, get_state

router = APIRouter(tags=["system"])
STARTED = time.time()


@router.get(
    "/whoami",
    response_model=WhoAmI,
    summary="The caller: its token's name, role, app (if limited to one), expiry and permissions",
)
async def whoami(caller: Caller = require("whoami", narrows=True)) -> dict[str, Any]:
    # Tools read this to see what a token may do: keep its shape.
    return {
        "name": caller.name,
        "role": caller.role,
        "app": caller.app,
        "expires_at": caller.expires_at,
        "permissions": sorted(ROLES.get(caller.role, ())),
    }


@router.get("/status", response_model=StatusView)
async def status(
    state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> dict[str, Any]:
    res = state.resources
    apps, rev = await res.list_apps()
    instances, _ = await res.list_instances(app=caller.app)
    nodes, _ = await res.list_nodes()
    deploys, _ = await res.list_deploys()
    apps = [a for a in apps if caller.sees(a.name)]
    phases = Counter(i.status.phase for i in instances)
    return {
        "version": __version__,
        "revision": rev,
        "uptime_s": round(time.time() - STARTED, 1),
        "gateway": state.gateway_url,
        "apps": len(apps),
        "instances": dict(phases),
        "nodes": [n.name for n in nodes],
        "builds_running": sum(d.status == "building" and caller.sees(d.app) for d in deploys),
    }
