"""Builds: what a builder process (`osless builder`, token role `builder`) asks of the API.

A builder registers (`POST /v1/builders`: a name on a lease of its own, kept alive with `PUT`),
claims a queued deploy (`POST /v1/builds/claim`, compare-and-swap: queued -> building, named after
it), reads its source, asks the app's uid, posts its log, uploads the layer archives the API does
not have and the image manifest, then posts the result. Every `/v1/builds/{deploy}/...` call names
the builder (`?builder=`): it must be the one that claimed the deploy, still `building`, and
registered with the caller's token; else 409 (`not_claimed`), as a builder that lost its lease finds.
The API checks what it receives: each archive's sha256 as it is written (its size bounded first),
the manifest's bytes (canonical JSON, at most 256 KiB: their sha256 is the image digest), its app
(the deploy's) and its layers (all present). Then, on success, it does what a release is made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import Field, ValidationError

from osless.api.auth import Caller, require
from osless.api.collector import COLLECTED_KEY, Collector, Kept
from osless.api.errors import ApiError, responses
from osless.api.models import APP_NAME_PATTERN, DIGEST_PATTERN, ID_PATTERN, Body, Deploy, Release
from osless.api.routes.config import config_misfits
from osless.api.routes.deploys import build_log, drop_source, end_build
from osless.api.runs import Target, release_steps
from osless.api.state import ApiState, get_state
from osless.bounds import cap
from osless.contracts import ImageManifest, manifest_problem
from osless.images import MAX_MANIFEST_BYTES, ImageStore, canonical_json, fsync_dir, manifest_json, write_file
from osless.store import Event, Store

router = APIRouter(tags=["builds"])
log = logging.getLogger("osless.api.builds")

BUILDER_TTL_S = 10.0  # a builder renews every 2 s: one that stops has its builds failed within ~12 s
CLAIM_WAIT_S = 20.0
MAX_WAITERS = 64  # long polls of one kind waiting at once on this server; past it 429
MAX_LOG_LINES = 1000  # per post; each line is cut to a log line's cap
LOST = "the builder lost its claim (its lease lapsed) and the deploy was failed meanwhile: deploy again"
Builder = Query(pattern=ID_PATTERN, description="the builder's name, from POST /v1/builders")
Digest = Path(pattern=DIGEST_PATTERN, description="64 lowercase hex digits: a sha256")


class _Waiters:
    """The long polls of one route waiting now: each polls the store every second, so their number
    is capped (a builder waits in one per slot and one for the collector)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.count >= MAX_WAITERS:
            raise ApiError(
                429,
                "too_many_waiters",
                f"{MAX_WAITERS} {self.what} long polls wait on this server already: "
                "try again later, or ask with wait_s=0",
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


_kept_waiters = _Waiters("GET /v1/builds/kept")
_claim_waiters = _Waiters("POST /v1/builds/claim")
# The answer of `kept` per collector, for one pass (the revision of `/collected`): made once per pass,
# not per builder asking (it reads every app and release and parses every manifest).
_kept_answers: weakref.WeakKeyDictionary[Collector, tuple[int, Kept]] = weakref.WeakKeyDictionary()
_kept_making: weakref.WeakKeyDictionary[Collector, asyncio.Lock] = weakref.WeakKeyDictionary()
_records = threading.Lock()  # a layer's archived record: checked and written as one


class BuilderLease(Body):
    name: str
    ttl_s: float


class AppAsk(Body):
    name: str = Field(pattern=APP_NAME_PATTERN, description="the app's name as the builder read it")


class AppAnswer(Body):
    app: str
    uid: int


class LogLines(Body):
    lines: list[str] = Field(max_length=MAX_LOG_LINES)


class Present(Body):
    present: bool


class ImageAnswer(Body):
    image: str


class BuildResult(Body):
    """`image` (built) or `error` (failed, the message shown to whoever deploys)."""

    image: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    error: str | None = Field(default=None, max_length=64 * 1024)
    deps_cached: bool = False
    seconds: float = Field(default=0.0, ge=0, le=86_400)


@router.post("/builders", status_code=201, response_model=BuilderLease, summary="Register a builder")
async def register_builder(state: ApiState = Depends(get_state), caller: Caller = require("build")) -> Any:
    name = await state.resources.register_builder(caller.id, BUILDER_TTL_S)
    return {"name": name, "ttl_s": BUILDER_TTL_S}


@router.put(
    "/builders/{name}", status_code=204, responses=responses(404), summary="Keep a builder's lease alive"
)
async def renew_builder(
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Response:
    if not await state.resources.renew_builder(name, caller.id):
        raise ApiError(
            404, "builder_lapsed", f"builder {name} is not registered (its lease lapsed): register anew"
        )
    return Response(status_code=204)


@router.delete("/builders/{name}", status_code=204, summary="A builder stops: its lease ends now")
async def drop_builder(
    name: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Response:
    await state.resources.drop_builder(name, caller.id)
    return Response(status_code=204)


@router.get(
    "/builds/kept",
    response_model=Kept,
    responses={204: {"description": "no pass of the collector within wait_s"}},
    summary="What the retention keeps (image digests, lock digests, uids), once the collector passed",
)
async def kept(
    request: Request,
    after: int = Query(default=0, ge=0, description="the `collection` of the last answer: wait for a newer"),
    wait_s: float = Query(default=0.0, ge=0, le=60),
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    """A builder collects its own store by this after each pass of the API's collector (every
    retention interval, and on `POST /v1/retention/collect`): answered at once if a pass came after
    `after`, else when one comes, or 204 past `wait_s`. Digests and numbers only, no names."""
    with _kept_waiters.hold() if wait_s > 0 else contextlib.nullcontext():
        return await _wait_kept(request, after, wait_s, state)


async def _kept_of(collector: Collector, collection: int) -> Kept:
    """The answer for the pass `collection` (made by the first asking after it, shared)."""
    making = _kept_making.setdefault(collector, asyncio.Lock())
    async with making:
        found = _kept_answers.get(collector)
        if found is None or found[0] != collection:
            found = (collection, await collector.kept())
            _kept_answers[collector] = found
        return found[1]


async def _wait_kept(request: Request, after: int, wait_s: float, state: ApiState) -> Any:
    store = state.resources.store
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        items, rev = await store.list(COLLECTED_KEY)
        if items and items[0].key == COLLECTED_KEY and items[0].mod_revision != after:
            return await _kept_of(state.collector, items[0].mod_revision)
        left = deadline - loop.time()
        if left <= 0 or await request.is_disconnected():
            return Response(status_code=204)
        await _changed(store, COLLECTED_KEY, rev, left)


@router.post(
    "/builds/claim",
    response_model=Deploy,
    responses={204: {"description": "nothing queued within wait_s"}, **responses(409)},
    summary="Claim the oldest queued deploy (waits up to wait_s for one)",
)
async def claim(
    request: Request,
    builder: str = Builder,
    wait_s: float = Query(default=0.0, ge=0, le=60),
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    await _registered(state, caller, builder)
    with _claim_waiters.hold() if wait_s > 0 else contextlib.nullcontext():
        return await _wait_claim(request, builder, wait_s, state)


async def _wait_claim(request: Request, builder: str, wait_s: float, state: ApiState) -> Any:
    res = state.resources
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        _, rev = await res.list_deploys()
        # Only deploys whose source is on this server's disk, or on a live peer's (fetched when read).
        away = await state.peers.reachable_sources() if state.peers is not None else set()

        def here(id: str, away: set[str] = away) -> bool:
            return id in away or state.source(id).is_file()

        got = await res.claim_deploy(builder, here)
        if got is not None:
            return got
        left = deadline - loop.time()
        if left <= 0 or await request.is_disconnected():
            return Response(status_code=204)
        await _changed(res.store, "/deploys/", rev, left)  # a deploy queued, then look again


async def _changed(store: Store, prefix: str, rev: int, left: float) -> None:
    """Until a change under `prefix` after `rev`, `left` seconds or one second, whichever comes first:
    a long poll looks again at least each second, so a server stopping waits for no longer and a
    client gone is seen."""
    watch = cast(AsyncGenerator[Event, None], store.watch(prefix, after_revision=rev))
    async with contextlib.aclosing(watch):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(left, 1.0)):
                await anext(watch)


@router.get(
    "/builds/{deploy_id}/source",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
        **responses(404, 409),
    },
    summary="The claimed deploy's source archive",
)
async def get_source(
    deploy_id: str,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> FileResponse:
    await _claimed(state, caller, deploy_id, builder)
    path = state.source(deploy_id)
    if not path.is_file() and state.peers is not None:  # uploaded through another server
        await state.peers.source(deploy_id, path)
    if not path.is_file():
        raise ApiError(
            404,
            "source_not_found",
            f"the source of deploy {deploy_id} is neither on this server nor on a live peer: fail the build",
        )
    return FileResponse(path, media_type="application/gzip")


@router.get(
    "/sources/{deploy_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
        **responses(403, 404, 422),
    },
    summary="A queued or building deploy's source, as uploaded here (for peer servers only)",
)
async def get_peer_source(
    deploy_id: str = Path(pattern=ID_PATTERN),
    state: ApiState = Depends(get_state),
    caller: Caller = require("pull"),
) -> FileResponse:
    """Another server's builder builds it: that server fetches it here (and checks its sha256)."""
    if caller.role != "peer":  # a node pulls images, never an app's source
        raise ApiError(403, "forbidden", "a deploy's source is for the servers alone (a peer token)")
    path = state.source(deploy_id)
    if not path.is_file():
        raise ApiError(404, "source_not_found", f"the source of deploy {deploy_id} is not on this server")
    return FileResponse(path, media_type="application/gzip")


@router.post(
    "/builds/{deploy_id}/app",
    response_model=AppAnswer,
    responses=responses(409),
    summary="The app a claimed deploy builds, and its uid (the API decides the name)",
)
async def app_of(
    body: AppAsk,
    deploy_id: str,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    deploy = await _claimed(state, caller, deploy_id, builder)
    # `?app=` or an app's token chose the name at upload: that wins, whatever the code names.
    name = deploy.app if deploy.app is not None else body.name
    if deploy.app is None:
        await state.resources.set_deploy_app(deploy_id, builder, name)
    return {"app": name, "uid": await state.resources.app_uid(name)}


@router.post(
    "/builds/{deploy_id}/log",
    status_code=204,
    responses=responses(409),
    summary="Append lines to a claimed deploy's build log",
)
async def post_log(
    body: LogLines,
    deploy_id: str,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Response:
    await _claimed(state, caller, deploy_id, builder)
    await build_log(state, deploy_id).append(body.lines)
    return Response(status_code=204)


@router.get(
    "/builds/{deploy_id}/layers/{sha256}",
    response_model=Present,
    responses=responses(409),
    summary="Whether the API has this layer archive (a builder uploads only those it lacks)",
)
async def has_layer(
    deploy_id: str,
    sha256: str = Digest,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    await _claimed(state, caller, deploy_id, builder)
    # Made young again: the builder skips its upload on this answer, so the grace must cover it.
    return {"present": await asyncio.to_thread(state.images.touch_archive, sha256)}


@router.put(
    "/builds/{deploy_id}/layers/{sha256}",
    status_code=204,
    responses=responses(400, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": True,
            # An uncompressed tar, whatever the type sent says: its sha256 is what is checked.
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    summary="Upload a layer archive; refused unless its bytes' sha256 is the path's",
)
async def put_layer(
    request: Request,
    deploy_id: str,
    sha256: str = Digest,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Response:
    await _claimed(state, caller, deploy_id, builder)
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise ApiError(400, "length_required", "send the layer archive with a Content-Length")
    if int(length) > state.max_layer_bytes:  # also held by BodyLimit as it reads
        raise ApiError(413, "too_large", f"a layer archive may be at most {state.max_layer_bytes} bytes")
    images = state.images
    fd, tmp = tempfile.mkstemp(prefix=f"upload-{sha256[:12]}-", suffix=".tar", dir=images.tmp_dir)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_sync, f)
        if digest.hexdigest() != sha256:
            raise ApiError(
                400,
                "digest_mismatch",
                f"the layer archive's bytes have sha256 {digest.hexdigest()}, not {sha256}: refused",
            )
        os.chmod(tmp, 0o400)
        os.replace(tmp, images.archive_path(sha256))  # equal sha256, equal bytes
        fsync_dir(images.archives_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return Response(status_code=204)


@router.put(
    "/builds/{deploy_id}/image",
    response_model=ImageAnswer,
    responses=responses(400, 409, 413),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    summary="Upload the image manifest (canonical JSON; its sha256 is the image digest)",
)
async def put_image(
    request: Request,
    deploy_id: str,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    deploy = await _claimed(state, caller, deploy_id, builder)
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_MANIFEST_BYTES:
            raise ApiError(413, "too_large", f"an image manifest may be at most {MAX_MANIFEST_BYTES} bytes")
    manifest = _manifest(data, deploy)
    images = state.images
    pairs = manifest.archived_layers().items()
    for _, archive in pairs:
        path = images.archive_path(archive.sha256)
        if not path.is_file() or path.stat().st_size != archive.size:
            raise ApiError(
                409,
                "layer_missing",
                f"layer archive {archive.sha256} of this image is not uploaded (or not whole): "
                "upload it first",
            )
    for layer, archive in pairs:
        # What the collector reads to keep an image's archives (`images.store.collect`).
        await asyncio.to_thread(_record_archive, images, layer, archive.sha256, archive.model_dump())
    image = await asyncio.to_thread(images.put_manifest, manifest)
    return {"image": image}


def _record_archive(images: ImageStore, layer: str, sha256: str, record: dict[str, Any]) -> None:
    """Layer `layer`'s archive is `sha256`'s, unless a record naming another archive that is still
    here was written first: that one stays. A build may not repoint another app's layer (an image
    from before archives is served by its records), and a rebuild of the same layer elsewhere (its
    bytes need not be the same) loses nothing by it: its manifest names its own archive, which the
    collector keeps for as long as the manifest is kept."""
    path = images.archived_dir / f"{layer}.json"
    with _records:
        try:
            had = str(json.loads(path.read_bytes())["sha256"])
            present = had != sha256 and images.archive_path(had).is_file()
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or not one (overwritten)
            present = False
        if present:
            log.info(
                "layer %s stays recorded with archive %s (this build's is %s)", layer, had[:12], sha256[:12]
            )
            return
        write_file(path, canonical_json(record), images.tmp_dir)


@router.post(
    "/builds/{deploy_id}/result",
    response_model=Deploy,
    responses=responses(409),
    summary="How the build ended: the image, released now, or the error",
)
async def post_result(
    body: BuildResult,
    deploy_id: str,
    builder: str = Builder,
    state: ApiState = Depends(get_state),
    caller: Caller = require("build"),
) -> Any:
    deploy = await _claimed(state, caller, deploy_id, builder)
    if body.image is None:
        deploy.status, deploy.error = "failed", cap(body.error or "the builder gave no reason")
        await _end(state, deploy, f"==> Build failed: {deploy.error}")
        return deploy
    try:  # checked against the contract when it was uploaded
        manifest = await asyncio.to_thread(state.images.get_manifest, body.image)
    except (KeyError, ValueError):
        raise ApiError(
            409, "image_missing", f"image {body.image} was not uploaded: PUT its manifest first"
        ) from None
    name = manifest.app
    if name != deploy.app:  # an image of another deploy's app: not this deploy's to release
        raise ApiError(
            400, "wrong_app", f"image {body.image} is not of app {deploy.app!r}, which {deploy_id} builds"
        )
    cfg, _ = await state.resources.get_config(name)
    refused, unset = config_misfits(manifest.config_schema(), cfg)
    if refused:
        deploy.status, deploy.error = (
            "failed",
            cap(
                "The stored config does not fit this release's schema, so nothing was rolled out: "
                + "; ".join(refused)
                + f". Fix it with `osless config set {name} KEY=VALUE` "
                f"or `osless config unset {name} KEY`, then deploy again."
            ),
        )
        await _end(state, deploy, f"==> Build failed: {deploy.error}")
        return deploy
    logbook = build_log(state, deploy_id)
    for problem in unset:
        await logbook.append([f"==> Config: {problem}; set it with `osless config set {name} KEY=VALUE`"])
    if manifest.release:
        # Before the release is current: the one before keeps serving whatever they do.
        found = await state.resources.get_app_rev(name)
        version = (found[0].latest_release if found else 0) + 1
        tgt = Target(name, version, body.image, await state.resources.app_uid(name))
        failed = await release_steps(state, tgt, manifest.release, logbook.append)
        if failed:
            deploy.status, deploy.error = (
                "failed",
                cap(f"{failed}; v{version} was not released, the app's current release keeps serving"),
            )
            await _end(state, deploy, f"==> Release failed: {deploy.error}")
            return deploy

    def make(version: int) -> Release:
        return Release(
            app=name,
            version=version,
            image=body.image or "",
            manifest=manifest,
            description=f"Deploy {(body.image or '')[:12]}",
            deploy_id=deploy.id,
        )

    deploy.deps_cached = body.deps_cached
    try:
        _, release = await state.resources.commit_release(name, make, deploy)
    except ApiError as e:
        if e.code == "deploy_ended":
            raise _lost(deploy_id) from None
        raise
    line = f"==> Released {name} v{release.version} (image sha256:{body.image[:12]}, {body.seconds:.2f}s)"
    await logbook.append([line], close=True)
    await drop_source(state, deploy_id)
    return await state.resources.get_deploy(deploy_id)


async def _end(state: ApiState, deploy: Deploy, line: str) -> None:
    if not await end_build(state, deploy, line):
        raise _lost(deploy.id)


def _lost(deploy_id: str) -> ApiError:
    return ApiError(409, "not_claimed", f"deploy {deploy_id}: {LOST}")


async def _registered(state: ApiState, caller: Caller, builder: str) -> None:
    token = await state.resources.builder_token(builder)
    if token is None:
        raise ApiError(
            409, "builder_lapsed", f"builder {builder} is not registered (its lease lapsed): register anew"
        )
    if token != caller.id:
        raise ApiError(403, "not_this_builder", f"builder {builder} was registered with another token")


async def _claimed(state: ApiState, caller: Caller, deploy_id: str, builder: str) -> Deploy:
    """The deploy, if `builder` (registered with the caller's token) claimed it and builds it still."""
    deploy = await state.resources.get_deploy(deploy_id)
    if deploy.status != "building" or deploy.builder != builder:
        raise ApiError(
            409,
            "not_claimed",
            f"deploy {deploy_id} is not being built by builder {builder} (it is {deploy.status}"
            + (f", by {deploy.builder})" if deploy.builder else ")")
            + "; claim a queued deploy with POST /v1/builds/claim",
        )
    await _registered(state, caller, builder)
    return deploy


def _manifest(data: bytes, deploy: Deploy) -> ImageManifest:
    """The manifest a builder sent, checked: the contract, canonical JSON (so its sha256 is the digest
    nodes check), for the deploy's app, each layer with an archive."""
    try:
        manifest = ImageManifest.model_validate_json(data)
    except ValidationError as e:
        raise ApiError(
            400, "invalid_manifest", f"the image manifest is refused: {manifest_problem(e)}"
        ) from None
    if manifest_json(manifest) != data:
        raise ApiError(
            400, "invalid_manifest", "send the image manifest as canonical JSON (sorted keys, no spaces)"
        )
    if manifest.app != deploy.app or deploy.app is None:
        raise ApiError(
            400,
            "wrong_app",
            f"the manifest is of app {manifest.app!r}, but deploy {deploy.id} builds {deploy.app!r}",
        )
    if manifest.layer_archives is None:
        raise ApiError(
            400,
            "invalid_manifest",
            "the manifest must name each layer (`layers`) and its archive (`layer_archives`)",
        )
    return manifest


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
