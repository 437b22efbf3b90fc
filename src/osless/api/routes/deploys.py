"""Deploys: upload source (queued for a builder process, see builds.py); the build log streams.

A deploy is `queued` once its archive is stored (`sources/{id}.tar.gz` in the data dir), `building`
once a builder claimed it, then `succeeded` (with its release) or `failed`. Its log is in the store
(`api.buildlog`), so any server shows it and a restart keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from osless.api.auth import Caller, check_scope, require
from osless.api.buildlog import BuildLog
from osless.api.errors import ApiError, responses
from osless.api.models import AppName, Deploy, DeployList, now
from osless.api.openapi import DEPLOY_LOG
from osless.api.state import ApiState, get_state
from osless.images import write_file
from osless.logs import read_tail

router = APIRouter(tags=["deploys"])
log = logging.getLogger("osless.api.deploys")

DEPLOY_LOG_CAP = 8 * 1024 * 1024
ORPHANED = "the builder building it stopped: deploy again"
NO_BUILDER = "no builder is running; start one with `osless builder --api URL`"
SOURCE_GONE = (
    "its source is on no live server (the one it was uploaded to stopped before another copied it): "
    "deploy again"
)
ARCHIVE_TYPES = {"application/gzip", "application/x-gzip", "application/octet-stream", "application/x-tar"}
# The body is read as it comes (not parsed by FastAPI), so the document says what it is.
_ARCHIVE = {"schema": {"type": "string", "format": "binary", "minLength": 1}}


@router.post(
    "/deploys",
    status_code=202,
    response_model=Deploy,
    responses=responses(400, 413, 415),
    openapi_extra={
        "requestBody": {"required": True, "content": {t: _ARCHIVE for t in sorted(ARCHIVE_TYPES)}}
    },
    summary="Upload a gzip'd tar of the app's source; a builder process builds it in the background",
)
async def create_deploy(
    request: Request,
    app: AppName | None = Query(default=None, description="app name; default: App(name) in code"),
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy", narrows=True),
) -> Deploy:
    if caller.app is not None:  # a token of one app deploys that app, whatever the code names
        check_scope(caller, app if app is not None else caller.app)
        app = caller.app
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ARCHIVE_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"upload the source as application/gzip (a .tar.gz), not {ctype or 'nothing'}",
        )
    archive = await request.body()  # bounded by the upload limit (api/app.py BodyLimit)
    if not archive:
        raise ApiError(400, "empty_upload", "the upload is empty; send the source as a .tar.gz body")
    deploy = Deploy(id="d-" + secrets.token_hex(6), app=app)
    # The archive whole on disk before the deploy is queued: a builder never claims a missing source.
    await asyncio.to_thread(write_file, state.source(deploy.id), archive, state.images.tmp_dir)
    if state.peers is not None:  # a builder of another server fetches it from here, and checks it
        await state.peers.record_source(deploy.id, hashlib.sha256(archive).hexdigest())
    await state.resources.put_deploy(deploy)
    await say_why_queued(state, [deploy])
    return deploy


async def say_why_queued(state: ApiState, deploys: list[Deploy]) -> None:
    """Each queued deploy's `reason`: no builder runs (it waits until one starts: never failed for
    it, as a build queue keeps its builds), or its source is on no live server, or a builder is
    about to claim it."""
    queued = [d for d in deploys if d.status == "queued"]
    if not queued:
        return
    builders = await state.resources.count_builders()
    reachable = await state.peers.reachable_sources() if state.peers is not None else set()
    for d in queued:
        if builders == 0:
            d.reason = NO_BUILDER
        elif d.id not in reachable and not state.source(d.id).is_file():
            d.reason = SOURCE_GONE
        else:
            d.reason = f"waiting for a builder to claim it ({builders} running)"


def build_log(state: ApiState, deploy_id: str) -> BuildLog:
    return BuildLog(state.resources.store, deploy_id, cap_bytes=DEPLOY_LOG_CAP)


async def drop_source(state: ApiState, deploy_id: str) -> None:
    """A deploy's source once its build ended: here, and its record for peers (the copy on the
    server it was uploaded to, if that is another, goes when that one ends a build of its own)."""
    state.source(deploy_id).unlink(missing_ok=True)
    if state.peers is not None:
        await state.peers.drop_source(deploy_id)


async def end_build(state: ApiState, deploy: Deploy, line: str) -> bool:
    """Record a build's failure (compare-and-swap: unless it ended meanwhile), its last log line, and
    its source's removal; whether it was written."""
    deploy.finished_at = now()
    written = await state.resources.end_deploy(deploy)
    if written:
        await build_log(state, deploy.id).append([line], close=True)
        await drop_source(state, deploy.id)
    return written


async def fail_orphaned_builds(state: ApiState) -> None:
    """Fail the deploys whose builder's lease is gone: the builder stopped mid-build (or lost the API
    for longer than its lease). Never one a live builder is building: its lease is kept alive."""
    for id in await state.resources.fail_orphaned_deploys(ORPHANED):
        log.warning("deploy %s failed: %s", id, ORPHANED)
        with contextlib.suppress(Exception):  # the deploy's state is written: the log is a courtesy
            await build_log(state, id).append([f"==> Build failed: {ORPHANED}"], close=True)
        await drop_source(state, id)


@router.get("/deploys", response_model=DeployList, summary="Recent deploys, newest first")
async def list_deploys(
    limit: int = Query(default=20, ge=1, le=500),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    items, rev = await state.resources.list_deploys()
    items = [d for d in items if caller.sees(d.app)]
    items.sort(key=lambda d: d.created_at, reverse=True)
    await say_why_queued(state, items[:limit])
    return {"items": [d.model_dump() for d in items[:limit]], "revision": rev}


@router.get("/deploys/{deploy_id}", response_model=Deploy, responses=responses(404))
async def get_deploy(
    deploy_id: str, state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> Deploy:
    deploy = await state.resources.get_deploy(deploy_id)
    check_scope(caller, deploy.app)
    await say_why_queued(state, [deploy])
    return deploy


@router.get(
    "/deploys/{deploy_id}/log",
    response_class=StreamingResponse,
    responses={**DEPLOY_LOG, **responses(404)},
    summary="The build log as NDJSON; follow=true streams until the end",
)
async def deploy_log(
    deploy_id: str,
    follow_: bool = Query(default=False, alias="follow"),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    check_scope(caller, (await state.resources.get_deploy(deploy_id)).app)
    path = state.deploy_log(deploy_id)
    stored = build_log(state, deploy_id)

    async def ended() -> bool:
        with contextlib.suppress(ApiError):
            return (await state.resources.get_deploy(deploy_id)).status not in ("queued", "building")
        return True  # deleted

    async def stream() -> AsyncIterator[bytes]:
        if path.exists():  # a build log of a release before logs moved to the store: read as it was
            for rec in read_tail([path], 100_000):
                yield (json.dumps(rec) + "\n").encode()
        elif follow_:
            async for rec in stored.follow(ended):
                yield (json.dumps(rec) + "\n").encode()
        else:
            for rec in (await stored.read())[0]:
                yield (json.dumps(rec) + "\n").encode()
        final = await state.resources.get_deploy(deploy_id)
        yield (json.dumps({"deploy": final.model_dump()}) + "\n").encode()

    return StreamingResponse(stream(), media_type="application/x-ndjson")
