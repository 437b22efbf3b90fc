"""Usage per app and hour (`osless usage`), the live view (`osless top`), and the nodes' reports that
feed both (`node.usage`; stored as `api.usage` says)."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field

from osless.api.auth import Caller, check_node, require
from osless.api.errors import ApiError, responses
from osless.api.resources import PLACED_PREFIX
from osless.api.state import ApiState, get_state
from osless.api.usage import APP_FIGURES, FUNCTION_FIGURES, KEEP_S, add_usage, put_live, read_usage, top
from osless.contracts import ID_PATTERN, Body

router = APIRouter(tags=["usage"])

MAX_ROWS = 10_000
Figure = Annotated[float, Field(ge=0, le=1e12)]
FunctionLabel = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{0,64}$")]  # "" for the app's own figures
_SINCE = re.compile(r"^(\d{1,7})([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageRow(Body):
    hour: int = Field(ge=0, le=1 << 40)
    app: str = Field(pattern=ID_PATTERN)
    function: FunctionLabel
    invocations: Figure = 0
    errors: Figure = 0
    duration_s: Figure = 0
    cpu_s: Figure = 0
    gb_s: Figure = 0
    cold_starts: Figure = 0


class LiveApp(Body):
    requests_per_s: Figure = 0
    errors_per_s: Figure = 0
    client_errors_per_s: Figure = 0
    in_flight: int = Field(default=0, ge=0, le=1 << 31)
    cpu: Figure = 0
    memory: int = Field(default=0, ge=0, le=1 << 50)
    cold_starts: int = Field(default=0, ge=0, le=1 << 40)
    latency_buckets: list[Annotated[int, Field(ge=0, le=1 << 50)]] = Field(
        default_factory=list, max_length=64
    )


class LiveInstance(Body):
    id: str = Field(pattern=ID_PATTERN)
    app: str = Field(pattern=ID_PATTERN)
    phase: str = Field(max_length=32)
    cpu: Figure = 0
    memory: int = Field(default=0, ge=0, le=1 << 50)


class LiveView(Body):
    apps: dict[Annotated[str, Field(pattern=ID_PATTERN)], LiveApp] = Field(
        default_factory=dict, max_length=MAX_ROWS
    )
    instances: list[LiveInstance] = Field(default_factory=list, max_length=MAX_ROWS)
    at: float = 0


class NodeUsage(Body):
    """A node's live view, and (once a minute) its usage rows since the last it sent."""

    now: LiveView
    usage: list[UsageRow] = Field(default_factory=list, max_length=MAX_ROWS)
    pending: list[UsageRow] = Field(default_factory=list, max_length=MAX_ROWS)


class Received(BaseModel):
    rows: int


class FunctionUsage(BaseModel):
    invocations: float
    errors: float
    duration_s: float


class HourUsage(BaseModel):
    hour: int
    functions: dict[str, FunctionUsage]
    cpu_s: float
    gb_s: float
    cold_starts: float


class UsageView(BaseModel):
    app: str
    since: float
    hours: list[HourUsage]
    functions: dict[str, FunctionUsage]
    totals: dict[str, float]


class TopApp(BaseModel):
    requests_per_s: float
    errors_per_s: float  # 5xx answers
    client_errors_per_s: float  # 4xx answers
    in_flight: int
    cpu: float
    memory: int
    cold_starts: int
    p50_ms: float | None
    p99_ms: float | None
    instances: int


class TopInstance(BaseModel):
    id: str
    app: str
    node: str
    phase: str
    cpu: float
    memory: int


class TopView(BaseModel):
    apps: dict[str, TopApp]
    instances: list[TopInstance]
    at: float


@router.put(
    "/nodes/{node}/usage",
    response_model=Received,
    responses=responses(403),
    summary="A node's live view (for `osless top`) and, once a minute, its usage rows (for `osless usage`)",
)
async def put_usage(
    body: NodeUsage,
    node: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("report"),
) -> dict[str, int]:
    check_node(caller, node)
    # Only apps that exist: made-up names would fill the store.
    apps, _ = await state.resources.list_apps()
    known = {a.name for a in apps}
    if caller.role == "node":
        # And, from a node, only those ever placed on it (a minute's rows may outlive the instance):
        # one taken over cannot bill, or fill `osless top` of, the apps it never ran.
        known &= await _placed_ever(state, node)
    now = body.now.model_dump()
    now["apps"] = {app: view for app, view in now["apps"].items() if app in known}
    now["instances"] = [i for i in now["instances"] if i["app"] in known]
    store = state.resources.store
    pending = [r.model_dump() for r in body.pending if r.app in known]
    await put_live(store, node, time.time(), now, pending)
    rows = [r.model_dump() for r in body.usage if r.app in known]
    if rows:
        await add_usage(store, rows)
    return {"rows": len(rows)}


async def _placed_ever(state: ApiState, node: str) -> set[str]:
    """The apps placed on `node` since they were made (`Resources.create_instance` records it)."""
    items, _ = await state.resources.store.list(PLACED_PREFIX)
    ever = {kv.key[len(PLACED_PREFIX) :].rsplit("/", 1)[0] for kv in items if kv.key.endswith(f"/{node}")}
    now_on, _ = await state.resources.list_instances(node=node)
    return ever | {i.app for i in now_on}


def parse_since(since: str) -> float:
    """Seconds back from now: `24h`, `90m`, `7d`, `3600s` or `3600`."""
    found = _SINCE.fullmatch(since.strip())
    seconds = int(found[1]) * _UNIT[found[2]] if found else -1
    if not 0 < seconds <= KEEP_S:
        raise ApiError(
            400,
            "invalid_request",
            f"since must be a duration like 24h, 90m or 7d, at most {KEEP_S // 86400}d (the usage kept), "
            f"not {since[:40]!r}",
        )
    return float(seconds)


@router.get(
    "/apps/{app}/usage",
    response_model=UsageView,
    responses=responses(400, 403, 404),
    summary="An app's invocations, GB-seconds, CPU-seconds and cold starts, per function and per hour",
)
async def get_usage(
    app: str = Path(pattern=ID_PATTERN),
    since: Annotated[str, Query(max_length=16, description="How far back: 24h, 90m, 7d")] = "24h",
    state: ApiState = Depends(get_state),
    caller: Caller = require("read"),
) -> dict[str, Any]:
    found = await state.resources.get_app(app)  # 404 for an unknown app
    # Not before the app was made: the hours of an earlier app of the same name, deleted, are not its.
    start = max(time.time() - parse_since(since), found.created_at // 3600 * 3600)
    hours = await read_usage(state.resources.store, app, start, time.time())
    functions: dict[str, dict[str, float]] = {}
    totals = {k: 0.0 for k in (*FUNCTION_FIGURES, *APP_FIGURES)}
    for hour in hours:
        for fn, figures in hour["functions"].items():
            into = functions.setdefault(fn, {k: 0.0 for k in FUNCTION_FIGURES})
            for k in FUNCTION_FIGURES:
                into[k] += figures[k]
                totals[k] += figures[k]
        for k in APP_FIGURES:
            totals[k] += hour[k]
    return {"app": app, "since": round(start, 3), "hours": hours, "functions": functions, "totals": totals}


@router.get(
    "/top",
    response_model=TopView,
    summary="Each app and instance now: requests/s, p50 and p99, errors, in flight, CPU, memory, cold starts",
)
async def get_top(
    state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> dict[str, Any]:
    apps, _ = await state.resources.list_apps()
    return await top(state.resources.store, time.time(), [a.name for a in apps if caller.sees(a.name)])
