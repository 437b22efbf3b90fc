"""Apps, their release history, rollback, restart and scale."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Response

from osless.api import wakes
from osless.api.auth import Caller, check_node, check_scope, require
from osless.api.errors import ApiError, responses
from osless.api.models import (
    ID_PATTERN,
    App,
    AppCreate,
    AppDetail,
    AppList,
    AppStatus,
    AppStatusList,
    DesiredRequest,
    Endpoints,
    GatewayStats,
    Release,
    ReleaseList,
    RollbackRequest,
    ScaleRequest,
    StatsReceived,
    StatsView,
    now,
)
from osless.api.openapi import WATCHABLE
from osless.api.queues import forget_app
from osless.api.state import ApiState, get_state
from osless.api.watch import list_or_watch
from osless.logs import remove_app_logs
from osless.store import Conflict

MAX_GATEWAYS_PER_NODE = 256  # as `osless up --gateways` allows

router = APIRouter(tags=["apps"])

STATS_PREFIX = "/gatewaystats/"  # a gateway's last report, under its name
STATS_FRESH_S = 5.0  # a gateway's report older than this no longer counts
STATS_KEPT_S = 60.0  # and one older than this is deleted


@router.get(
    "/apps",
    response_model=AppList,
    responses={**WATCHABLE, **responses(400)},
    summary="List apps (watch=true streams changes after `revision`)",
)
async def list_apps(
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    res = state.resources

    async def items() -> tuple[list[App], int]:
        found, rev = await res.list_apps()
        return [a for a in found if caller.sees(a.name)], rev

    return await list_or_watch(
        res, "apps", watch=watch, revision=revision, items=items, keep=lambda ev: caller.sees(ev["name"])
    )


@router.get(
    "/appstatus",
    response_model=AppStatusList,
    responses={**WATCHABLE, **responses(400)},
    summary="The apps' status: desired instances and why (watch=true streams changes after `revision`)",
)
async def list_app_statuses(
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    res = state.resources

    async def items() -> tuple[list[AppStatus], int]:
        found, rev = await res.list_app_statuses()
        return [s for s in found if caller.sees(s.app)], rev

    return await list_or_watch(
        res, "appstatus", watch=watch, revision=revision, items=items, keep=lambda ev: caller.sees(ev["name"])
    )


@router.post("/apps", status_code=201, response_model=App, responses=responses(409))
async def create_app(
    body: AppCreate, state: ApiState = Depends(get_state), caller: Caller = require("deploy", narrows=True)
) -> App:
    check_scope(caller, body.name)
    return await state.resources.create_app(App(name=body.name))


@router.get("/apps/{app}", response_model=AppDetail, responses=responses(404))
async def get_app(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, Any]:
    res = state.resources
    a = await res.get_app(app)
    status, _ = await res.get_app_status(app)
    instances, _ = await res.list_instances(app=app)
    release = await res.get_release(app, a.current_release) if a.current_release else None
    calls, called_by = await _call_graph(state, app)
    return {
        **a.model_dump(),
        "status": status.model_dump(),
        "release": release.model_dump() if release else None,
        "instances": [i.model_dump() for i in instances],
        "calls": calls,
        "called_by": called_by,
    }


async def _call_graph(state: ApiState, app: str) -> tuple[dict[str, int], dict[str, int]]:
    """Whom the app called and who called it, by name through the egress proxies, summed over nodes."""
    calls: Counter[str] = Counter()
    called_by: Counter[str] = Counter()
    items, _ = await state.resources.store.list("/calls/")
    for kv in items:
        for edge in json.loads(kv.value):
            if edge.get("caller") == app:
                calls[str(edge.get("callee"))] += int(edge.get("count", 0))
            if edge.get("callee") == app:
                called_by[str(edge.get("caller"))] += int(edge.get("count", 0))
    return dict(calls), dict(called_by)


@router.get(
    "/apps/{app}/endpoints",
    response_model=Endpoints,
    responses={**WATCHABLE, **responses(400, 404)},
    summary="Where the app answers: its URLs and its ready instances "
    "(watch=true streams the app's instance changes)",
)
async def endpoints(
    app: str,
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("describe"),
) -> Any:
    res = state.resources
    await res.get_app(app)

    def keep(ev: dict[str, Any]) -> bool:
        return ev["object"] is None or ev["object"]["app"] == app

    async def items() -> tuple[list[Any], int]:
        found, rev = await res.list_instances(app=app)
        return [i for i in found if i.status.phase == "ready"], rev

    if watch:
        return await list_or_watch(res, "instances", watch=True, revision=revision, items=items, keep=keep)
    ready, rev = await items()
    return {
        "app": app,
        "url": f"{state.gateway_url}/{app}/",
        "internal_url": f"http://{app}.osless",
        "instances": [
            {"id": i.id, "node": i.node, "release": i.release, "socket": i.status.socket} for i in ready
        ],
        "revision": rev,
    }


@router.delete("/apps/{app}", status_code=204, responses=responses(404, 409))
async def delete_app(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("deploy")
) -> Response:
    try:
        await state.resources.delete_app(app)
    except ApiError as e:
        # Gone already: what the engine may still hold of it goes too (a delete whose forget below
        # failed is finished by deleting again), so a new app of the name runs none of it.
        if e.status == 404 and state.broker is not None:
            await forget_app(state.broker, app)
        raise
    if state.broker is not None:  # its queues, consumers, dead letters and queued invocations
        await forget_app(state.broker, app)
    # Its logs go with it: a new app of the same name must never read them (each node removes its
    # own copy once nothing of the app runs there).
    await remove_app_logs(state.app_log_dir(app))
    return Response(status_code=204)


@router.get("/apps/{app}/releases", response_model=ReleaseList, responses=responses(404))
async def list_releases(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, Any]:
    await state.resources.get_app(app)
    releases, rev = await state.resources.list_releases(app)
    return {"items": [r.model_dump(exclude={"manifest"}) for r in releases], "revision": rev}


@router.get("/apps/{app}/releases/{version}", response_model=Release, responses=responses(404))
async def get_release(
    app: str, version: int, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> Release:
    return await state.resources.get_release(app, version)


@router.post("/apps/{app}/rollback", response_model=Release, status_code=201, responses=responses(404, 409))
async def rollback(
    app: str,
    body: RollbackRequest | None = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Release:
    res = state.resources
    a = await res.get_app(app)
    if a.current_release is None:
        raise ApiError(409, "no_release", f"app {app!r} has no release to roll back from; deploy it first")
    if body is not None and body.to is not None:
        target = await res.get_release(app, body.to)
    else:
        releases, _ = await res.list_releases(app)
        current = next((r for r in releases if r.version == a.current_release), None)
        older = [
            r
            for r in releases
            if r.version < a.current_release and (current is None or r.image != current.image)
        ]
        if not older:
            raise ApiError(
                409,
                "no_previous_release",
                f"app {app!r} has no earlier release to roll back to; `osless releases {app}` lists them",
            )
        target = older[-1]

    def make(version: int) -> Release:
        return Release(
            app=app,
            version=version,
            image=target.image,
            manifest=target.manifest,
            description=f"Rollback to v{target.version}",
            created_at=now(),
        )

    _, release = await res.commit_release(app, make)
    return release


@router.post(
    "/apps/{app}/restart",
    response_model=App,
    responses=responses(404, 409),
    summary="Replace every instance of the app with fresh ones of the same release, rolling",
)
async def restart(app: str, state: ApiState = Depends(get_state), caller: Caller = require("deploy")) -> App:
    # The app's spec says "instances made after restart N": the scheduler replaces the others as it
    # rolls out a release (new ones first, the old deleted once they are ready), so the app keeps
    # serving, and a restart survives the CLI that asked for it and a change of leader.
    current = await state.resources.get_app(app)
    if current.current_release is None:
        raise ApiError(409, "no_release", f"app {app!r} has no release to restart; deploy it first")

    def change(a: App) -> App:
        a.restart, a.updated_at = a.restart + 1, now()
        return a

    return await state.resources.update_app(app, change)


@router.put(
    "/apps/{app}/scale",
    response_model=App,
    responses=responses(404, 409),
    summary="Instance bounds and the autoscaling policy",
)
async def scale(
    app: str, body: ScaleRequest, state: ApiState = Depends(get_state), caller: Caller = require("deploy")
) -> App:
    current = await state.resources.get_app(app)
    lo = body.min if body.min is not None else current.min
    hi = body.max if body.max is not None else current.max
    if lo > hi:
        raise ApiError(422, "invalid_request", f"min ({lo}) must not exceed max ({hi})")

    def change(a: App) -> App:
        a.min, a.max, a.updated_at = lo, hi, now()
        policy = body.model_dump(exclude_none=True, exclude={"min", "max"})
        a.autoscale = a.autoscale.model_copy(update=policy)
        return a

    return await state.resources.update_app(app, change)


@router.put(
    "/apps/{app}/desired",
    response_model=AppStatus,
    responses=responses(404, 409),
    summary="The autoscaler's decision: instances wanted now (the app's status; its spec is untouched)",
)
async def set_desired(
    app: str, body: DesiredRequest, state: ApiState = Depends(get_state), caller: Caller = require("operate")
) -> AppStatus:
    def change(_: App, s: AppStatus) -> AppStatus | None:
        if s.desired == body.desired and s.scale_reason == body.reason:
            return None
        s.desired, s.scale_reason = body.desired, body.reason
        return s

    return await state.resources.update_app_status(app, change)


@router.post(
    "/apps/{app}/wake",
    response_model=AppStatus,
    responses=responses(404, 409),
    summary="A request found the app at zero: start one (answers the app's status)",
)
async def wake(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("route")
) -> AppStatus:
    return await wakes.wake(state, app, "a request arrived while at zero", touch=True)


@router.put(
    "/gateways/{name}/stats",
    response_model=StatsReceived,
    summary="What a gateway saw of each app (for the autoscaler)",
)
async def put_stats(
    body: GatewayStats,
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("route"),
) -> dict[str, int]:
    if caller.role == "gateway":  # a gateway reports as one of its own node's: `<node>.gw-<k>`
        node, _, k = name.rpartition(".gw-")
        if not (k.isdigit() and 1 <= int(k) <= MAX_GATEWAYS_PER_NODE):
            raise ApiError(
                422,
                "invalid_request",
                f"a gateway reports as <node>.gw-<k>, k from 1 to {MAX_GATEWAYS_PER_NODE}, not {name!r}",
            )
        check_node(caller, node)
    # Only apps that exist (one deleted meanwhile is dropped, not refused: the rest still counts);
    # figures are bounded by the model. Made-up ones would drive the autoscaler or fill the store.
    apps, _ = await state.resources.list_apps()
    known = {a.name for a in apps}
    body.apps = {app: figures for app, figures in body.apps.items() if app in known}
    # In the store, so that an API restart (or another API server) loses nothing of it; the next
    # report replaces it, and `GET /v1/stats` forgets reports past STATS_FRESH_S.
    report = {"at": now(), "interval_s": body.interval_s, "apps": body.apps}
    await state.resources.store.put(f"{STATS_PREFIX}{name}", json.dumps(report).encode())
    return {"apps": len(body.apps)}


@router.get(
    "/stats",
    response_model=StatsView,
    summary="Traffic per app, summed over the gateways that reported lately",
)
async def get_stats(
    state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> dict[str, Any]:
    store = state.resources.store
    at = now()
    apps: dict[str, dict[str, float]] = {}
    items, _ = await store.list(STATS_PREFIX)
    for kv in items:
        report = json.loads(kv.value)
        if report["at"] < at - STATS_KEPT_S:  # a gateway long gone (or a made-up name): forgotten
            with contextlib.suppress(Conflict):
                await store.delete(kv.key, if_revision=kv.mod_revision)
            continue
        if report["at"] < at - STATS_FRESH_S:
            continue
        for app, figures in report["apps"].items():
            if not caller.sees(app):
                continue
            into = apps.setdefault(app, {"concurrency": 0.0, "requests": 0.0, "waiting": 0.0})
            for key in into:
                into[key] += float(figures.get(key, 0.0))
    return {"apps": apps, "at": now()}
