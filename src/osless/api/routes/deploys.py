"""Deploys: upload source, build an image on the platform, release it; the build log streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import traceback
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from osless.api.auth import Caller, check_scope, require
from osless.api.errors import ApiError, responses
from osless.api.models import AppName, Deploy, DeployList, Release, now
from osless.api.openapi import DEPLOY_LOG
from osless.api.routes.config import config_misfits
from osless.api.state import ApiState, get_state
from osless.bounds import cap
from osless.builder import BuildError
from osless.logs import LogWriter, follow, read_tail

router = APIRouter(tags=["deploys"])
log = logging.getLogger("osless.api.deploys")

DEPLOY_LOG_CAP = 8 * 1024 * 1024
ORPHANED = "the server building it stopped: deploy again"
LOST = "this server lost its build lease and another failed the deploy meanwhile: deploy again"
UID_TIMEOUT_S = 60.0
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
    summary="Upload a gzip'd tar of the app's source; the build runs in the background",
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
    archive = await request.body()
    if not archive:
        raise ApiError(400, "empty_upload", "the upload is empty; send the source as a .tar.gz body")
    deploy = Deploy(id="d-" + secrets.token_hex(6), app=app, builder=state.builder_id or None)
    await state.resources.put_deploy(deploy)
    task = asyncio.create_task(_run_build(state, deploy, archive))
    state.builds[deploy.id] = task
    task.add_done_callback(lambda _: state.builds.pop(deploy.id, None))
    return deploy


async def _run_build(state: ApiState, deploy: Deploy, archive: bytes) -> None:
    # Not rotated: a build's log keeps its start, and stops at its cap saying so.
    writer = LogWriter(state.deploy_log(deploy.id), source=deploy.id, cap_bytes=DEPLOY_LOG_CAP, rotate=False)
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            writer.write(line.rstrip("\n"), "build")

    loop = asyncio.get_running_loop()
    ended_elsewhere = False

    def uid_for(name: str) -> int:
        # The build asks from its worker thread, once it knows the app's name (`?app=`, or read
        # from the code before any of it runs): its steps run as that app's own uid.
        future = asyncio.run_coroutine_threadsafe(state.resources.app_uid(name), loop)
        return future.result(timeout=UID_TIMEOUT_S)

    try:
        result = await asyncio.to_thread(
            state.builder.build, archive, emit, app_name=deploy.app, uid_for=uid_for
        )
        name = str(result.manifest["app"])
        cfg, _ = await state.resources.get_config(name)
        refused, unset = config_misfits(result.manifest.get("config") or {}, cfg)
        if refused:
            raise BuildError(
                "The stored config does not fit this release's schema, so nothing was rolled out: "
                + "; ".join(refused)
                + f". Fix it with `osless config set {name} KEY=VALUE` "
                f"or `osless config unset {name} KEY`, then deploy again."
            )
        for problem in unset:
            emit(f"==> Config: {problem}; set it with `osless config set {name} KEY=VALUE`")

        def make(version: int) -> Release:
            return Release(
                app=name,
                version=version,
                image=result.image,
                manifest=result.manifest,
                description=f"Deploy {result.image[:12]}",
                deploy_id=deploy.id,
            )

        deploy.deps_cached = result.deps_cached
        try:
            _, release = await state.resources.commit_release(name, make, deploy)
        except ApiError as e:
            if e.code != "deploy_ended":
                raise
            log.warning("deploy %s was failed by another server while this one built it", deploy.id)
            emit(f"==> Not released: {LOST}")
            ended_elsewhere = True
            return  # as recorded already: nothing more to write
        image = result.image[:12]
        emit(f"==> Released {name} v{release.version} (image sha256:{image}, {result.seconds:.2f}s)")
    except BuildError as e:
        # The message may quote an upload or an app's output: capped before it is stored or logged.
        deploy.status, deploy.error = "failed", cap(str(e))
        emit(f"==> Build failed: {deploy.error}")
    except Exception as e:  # the deploy must end as failed, whatever broke
        log.error("deploy %s crashed: %s", deploy.id, cap("".join(traceback.format_exception(e))))
        deploy.status, deploy.error = "failed", cap(f"internal error during build: {type(e).__name__}: {e}")
        emit(f"==> Build failed: {deploy.error}")
    finally:
        if (
            deploy.status != "succeeded" and not ended_elsewhere
        ):  # a success was recorded with its release, atomically
            if deploy.status == "building":  # cancelled: this server is stopping
                deploy.status, deploy.error = "failed", ORPHANED
            deploy.finished_at = now()
            with contextlib.suppress(ApiError):  # deleted meanwhile
                if not await state.resources.end_deploy(deploy):
                    log.warning("deploy %s was ended by another server while this one built it", deploy.id)
        writer.close()


async def fail_orphaned_builds(state: ApiState) -> None:
    """Fail the deploys whose builder's lease is gone: its server stopped mid-build (or lost the store
    for longer than its lease). Never one a live server is building: its lease is kept alive."""
    for id in await state.resources.fail_orphaned_deploys(lambda d: d in state.builds, ORPHANED):
        log.warning("deploy %s failed: %s", id, ORPHANED)


@router.get("/deploys", response_model=DeployList, summary="Recent deploys, newest first")
async def list_deploys(
    limit: int = Query(default=20, ge=1, le=500),
    state: ApiState = Depends(get_state),
    caller: Caller = require("read", narrows=True),
) -> Any:
    items, rev = await state.resources.list_deploys()
    items = [d for d in items if caller.sees(d.app)]
    items.sort(key=lambda d: d.created_at, reverse=True)
    return {"items": [d.model_dump() for d in items[:limit]], "revision": rev}


@router.get("/deploys/{deploy_id}", response_model=Deploy, responses=responses(404))
async def get_deploy(
    deploy_id: str, state: ApiState = Depends(get_state), caller: Caller = require("read", narrows=True)
) -> Deploy:
    deploy = await state.resources.get_deploy(deploy_id)
    check_scope(caller, deploy.app)
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

    async def stream() -> AsyncIterator[bytes]:
        if follow_:
            async for rec in follow(
                lambda: [path], tail=100_000, poll_s=0.05, until=lambda: deploy_id not in state.builds
            ):
                yield (json.dumps(rec) + "\n").encode()
        else:
            for rec in read_tail([path], 100_000):
                yield (json.dumps(rec) + "\n").encode()
        final = await state.resources.get_deploy(deploy_id)
        yield (json.dumps({"deploy": final.model_dump()}) + "\n").encode()

    return StreamingResponse(stream(), media_type="application/x-ndjson")
