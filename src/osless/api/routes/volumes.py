"""An app's volumes and their files (`osless volumes`), asked of the node that holds each volume.

A volume lives on the disk of each node the app ran on (`node.volumes`), as its logs do, so the API
asks the nodes (`node.volapi`), showing each a token made for that node and app alone (`volumes`
role, a minute: `secrets.scoped_token`), never the caller's. Reading a volume's files is reading
the app's data, so every route needs `deploy` (an admin has it), as writing does; writes are
audited (the guard records every PUT and DELETE). A volume held by several nodes (the app ran on
each: one copy per node, never synchronised) is named with `?node=`; one held by none was never
made: a node makes it when the app first starts there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.responses import Response

from osless.api.auth import Caller, require
from osless.api.errors import ApiError, responses
from osless.api.state import ApiState, get_state
from osless.bounds import cap
from osless.contracts import ID_PATTERN, VOLUME_NAME_PATTERN, Node, volume_path
from osless.sdk.app import DEFAULT_VOLUME_MB

router = APIRouter(tags=["volumes"])

MAX_FILE_BYTES = 4 * 1024 * 1024 * 1024  # one upload (node.volapi holds the same); BodyLimit reads it
TOKEN_TTL_S = 60.0  # the node checks it when a request starts: an upload may outlive it
NODE_CONNECT_S = 3.0
NODE_ASK_S = 10.0  # a node's list of volumes, or its answer's head
# The longest a transfer waits for one read: past a volume's attach (mkfs, e2fsck, resize2fs; up to
# 300 s each) a node that sends nothing is stuck, and the request ends rather than hang.
NODE_TRANSFER_S = 330.0
# Bytes of a node's JSON answer read: its longest is a listing of 1000 names of 255 control
# characters, each sent as a 6-byte escape (1.6 MB).
MAX_NODE_ANSWER = 4 * 1024 * 1024
VolumeName = Annotated[str, PathParam(pattern=VOLUME_NAME_PATTERN)]
NodeQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="The node holding the volume")]
FilePath = Annotated[str, PathParam(max_length=1024, description="A path inside the volume")]


class VolumeView(BaseModel):
    name: str
    path: str | None  # where the current release mounts it; None: no longer declared
    size_mb: int | None  # declared by the current release
    nodes: list[dict[str, Any]]  # each node holding it: {node, size_bytes, used_bytes, mounted}


class VolumeList(BaseModel):
    items: list[VolumeView]
    unreachable: list[str]  # nodes that did not answer: their copies are missing from this list


class Entry(BaseModel):
    name: str
    type: str  # file, folder, link or other (fifo, socket, device: listed, never read)
    size: int
    mtime: float


class EntryList(BaseModel):
    node: str
    items: list[Entry]
    truncated: bool  # the folder holds more than `limit` entries: these are the first it gave
    limit: int


class Written(BaseModel):
    node: str
    path: str
    size: int


async def _uid(state: ApiState, app: str) -> int:
    """The app's uid, which the node checks its volumes' owner against: a volume an earlier app of the
    same name left on a node (deleted, not put away yet) is that app's data, never this one's."""
    uid = (await state.resources.get_app(app)).uid
    if uid is None:
        raise ApiError(404, "volume_not_found", f"app {app} has no volume: it never ran")
    return uid


async def _nodes(state: ApiState, app: str) -> list[Node]:
    """The live nodes the app was placed on, the only ones asked: another node's claim to hold its
    volume would have the API send it the app's uploads (and its word for the app's files)."""
    nodes, _ = await state.resources.list_nodes()
    placed = await state.resources.placed_nodes(app)
    return [n for n in nodes if n.name in placed]


def _shown(state: ApiState, app: str, node: str) -> dict[str, str]:
    token = state.secrets.scoped_token("volumes", app, TOKEN_TTL_S, node)
    return {"authorization": f"Bearer {token}"}


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(NODE_ASK_S, connect=NODE_CONNECT_S))


async def _read(resp: httpx.Response) -> Any:
    body = b""
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > MAX_NODE_ANSWER:
            raise ApiError(503, "node_unavailable", "a node sent an answer too large to be one")
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(503, "node_unavailable", "a node's answer was not JSON") from None


async def _passed_on(resp: httpx.Response, node: str) -> ApiError:
    """A node's refusal as the API's own error: its 4xx said on (capped); anything else a 503."""
    try:
        err = (await _read(resp))["error"]
        code, message = cap(str(err["code"]), 64), cap(str(err["message"]), 1000)
    except (ApiError, KeyError, TypeError):
        code, message = "node_error", f"it answered {resp.status_code}"
    if resp.status_code in (400, 404, 409, 413):
        return ApiError(resp.status_code, code, message)
    return ApiError(503, "node_unavailable", f"node {node} could not do it: {message}")


async def _held(
    state: ApiState, client: httpx.AsyncClient, app: str, uid: int, nodes: list[Node]
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Each node's volumes of `app` (by node name), and the nodes that did not answer."""

    async def ask(node: Node) -> list[dict[str, Any]] | None:
        if not node.api:
            return None
        try:
            async with client.stream(
                "GET",
                f"{node.api}/volumes/apps/{app}",
                params={"uid": uid},
                headers=_shown(state, app, node.name),
                # whatever the caller's client waits for a transfer: a stuck node is no holder
                timeout=httpx.Timeout(NODE_ASK_S, connect=NODE_CONNECT_S),
            ) as resp:
                if resp.status_code != 200:
                    return None
                items = (await _read(resp)).get("items")
        except (httpx.HTTPError, ApiError, AttributeError):
            return None
        if not isinstance(items, list):
            return None
        return [
            {
                "name": str(v["name"]),
                "size_bytes": v.get("size_bytes"),
                "used_bytes": v.get("used_bytes"),
                "mounted": bool(v.get("mounted")),
            }
            for v in items[:256]
            if isinstance(v, dict) and isinstance(v.get("name"), str)
        ]

    answers = await asyncio.gather(*(ask(n) for n in nodes))
    held = {n.name: a for n, a in zip(nodes, answers, strict=True) if a is not None}
    return held, [n.name for n, a in zip(nodes, answers, strict=True) if a is None]


async def _declared(state: ApiState, app: str) -> dict[str, tuple[str, int]]:
    """The current release's volumes: name -> (mount path, size in MB)."""
    spec = await state.resources.get_app(app)
    if not spec.current_release:
        return {}
    manifest = (await state.resources.get_release(app, spec.current_release)).manifest
    found: dict[str, tuple[str, int]] = {}
    for path, v in (manifest.volumes or {}).items():
        name, size = (v, DEFAULT_VOLUME_MB) if isinstance(v, str) else (v.name, v.size_mb)
        found.setdefault(name, (path, size))
    return found


async def _holder(
    state: ApiState, client: httpx.AsyncClient, app: str, vol: str, node: str | None
) -> tuple[Node, int]:
    """The node to ask about volume `vol` (`node`, or the only one holding it), and the app's uid."""
    uid = await _uid(state, app)
    nodes = await _nodes(state, app)
    if node is not None:
        named = [n for n in nodes if n.name == node]
        if not named:
            raise ApiError(
                404,
                "node_not_found",
                f"no live node {node!r} on which {app} ran: `osless volumes ls {app}` lists those holding "
                "its volumes",
            )
        return named[0], uid
    held, unreachable = await _held(state, client, app, uid, nodes)
    holders = sorted(name for name, vols in held.items() if any(v["name"] == vol for v in vols))
    if len(holders) > 1:
        raise ApiError(
            409,
            "several_nodes",
            f"volume {vol} of {app} is on nodes {', '.join(holders)} (one copy each): pass --node NODE",
        )
    if not holders:
        silent = f"; nodes {', '.join(unreachable)} did not answer" if unreachable else ""
        raise ApiError(
            404,
            "volume_not_found",
            f"no node holds volume {vol} of {app}: a node makes it when the app first starts there "
            f"(deploy it, or scale it up once){silent}",
        )
    return next(n for n in nodes if n.name == holders[0]), uid


def _at(node: Node) -> str:
    if not node.api:
        raise ApiError(503, "node_unavailable", f"node {node.name} names no node API (an earlier release?)")
    return node.api


async def _ask(
    state: ApiState,
    client: httpx.AsyncClient,
    app: str,
    holder: Node,
    method: str,
    tail: str,
    *,
    expect: int,
    params: dict[str, Any],
    headers: dict[str, str] | None = None,
    content: AsyncIterator[bytes] | None = None,
) -> Any:
    """Ask the node holding the volume (`{node api}/volumes/apps/{app}/{tail}`) with a token shown to
    it alone: its JSON answer (None for an empty one), its refusal passed on, or a 503."""
    try:
        async with client.stream(
            method,
            f"{_at(holder)}/volumes/apps/{app}/{tail}",
            params=params,
            headers={**_shown(state, app, holder.name), **(headers or {})},
            content=content,
        ) as resp:
            if resp.status_code != expect:
                raise await _passed_on(resp, holder.name)
            return None if expect == 204 else await _read(resp)
    except httpx.HTTPError as e:
        raise ApiError(503, "node_unavailable", f"node {holder.name} did not answer: {e}") from None


def _checked(path: str) -> str:
    """`path` as the node is sent it: checked (no '..', NUL, absolute), then quoted."""
    try:
        return quote("/".join(volume_path(path)), safe="/")
    except ValueError as e:
        raise ApiError(400, "invalid_path", f"{e} (got {cap(path, 200)!r})") from None


@router.get(
    "/apps/{app}/volumes",
    response_model=VolumeList,
    responses=responses(404),
    summary="The app's volumes: where the current release mounts each, its size, and the nodes holding it",
)
async def list_volumes(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("deploy")
) -> dict[str, Any]:
    declared = await _declared(state, app)
    uid = await _uid(state, app)
    nodes = await _nodes(state, app)
    async with _client() as client:
        held, unreachable = await _held(state, client, app, uid, nodes)
    views: dict[str, dict[str, Any]] = {
        name: {"name": name, "path": path, "size_mb": size, "nodes": []}
        for name, (path, size) in declared.items()
    }
    for node, vols in sorted(held.items()):
        for v in vols:
            view = views.setdefault(
                v["name"], {"name": v["name"], "path": None, "size_mb": None, "nodes": []}
            )
            view["nodes"].append({"node": node, **{k: v[k] for k in ("size_bytes", "used_bytes", "mounted")}})
    return {"items": sorted(views.values(), key=lambda v: str(v["name"])), "unreachable": unreachable}


@router.get(
    "/apps/{app}/volumes/{vol}/entries",
    response_model=EntryList,
    responses=responses(400, 404, 409, 503),
    summary="What a path of the volume holds: a folder's entries (the first 1000), or the one file",
)
async def list_entries(
    app: str,
    vol: VolumeName,
    path: Annotated[str, Query(max_length=1024)] = "",
    node: NodeQuery = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Any:
    try:
        path = "/".join(volume_path(path))
    except ValueError as e:
        raise ApiError(400, "invalid_path", f"{e} (got {cap(path, 200)!r})") from None
    async with _client() as client:
        holder, uid = await _holder(state, client, app, vol, node)
        got = await _ask(
            state, client, app, holder, "GET", f"{vol}/entries", expect=200, params={"path": path, "uid": uid}
        )
    try:
        return EntryList(node=holder.name, items=got["items"], truncated=got["truncated"], limit=got["limit"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(503, "node_unavailable", f"node {holder.name} answered no listing") from None


@router.get(
    "/apps/{app}/volumes/{vol}/files/{path:path}",
    response_class=StreamingResponse,
    responses={
        200: {"description": "The file's bytes", "content": {"application/octet-stream": {}}},
        **responses(400, 404, 409, 503),
    },
    summary="Download a file of the volume (a regular file only: never a link, fifo or device)",
)
async def get_file(
    app: str,
    vol: VolumeName,
    path: FilePath,
    node: NodeQuery = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Any:
    where = _checked(path)
    client = httpx.AsyncClient(timeout=httpx.Timeout(NODE_TRANSFER_S, connect=NODE_CONNECT_S))
    try:
        holder, uid = await _holder(state, client, app, vol, node)
        ask = client.build_request(
            "GET",
            f"{_at(holder)}/volumes/apps/{app}/{vol}/files/{where}",
            params={"uid": uid},
            headers=_shown(state, app, holder.name),
        )
        resp = await client.send(ask, stream=True)
    except httpx.HTTPError as e:
        await client.aclose()
        raise ApiError(503, "node_unavailable", f"the node did not answer: {e}") from None
    except BaseException:
        await client.aclose()
        raise
    if resp.status_code != 200:
        try:
            raise await _passed_on(resp, holder.name)
        finally:
            await resp.aclose()
            await client.aclose()

    async def body() -> AsyncIterator[bytes]:
        # Closed however the answer ends, the client gone midway included: the node lets go too.
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()
            await client.aclose()

    size = resp.headers.get("x-osless-size", "")
    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"x-osless-size": size, "x-osless-node": holder.name} if size.isdigit() else {},
    )


@router.put(
    "/apps/{app}/volumes/{vol}/files/{path:path}",
    status_code=201,
    response_model=Written,
    responses=responses(400, 404, 409, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    summary="Upload a file into the volume (409 if it exists, unless force=true); its folders are made",
)
async def put_file(
    request: Request,
    app: str,
    vol: VolumeName,
    path: FilePath,
    force: bool = False,
    node: NodeQuery = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Any:
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise ApiError(400, "length_required", "send the file with a Content-Length")
    if int(length) > MAX_FILE_BYTES:  # also held by BodyLimit as it reads
        raise ApiError(413, "too_large", f"a file uploaded may be at most {MAX_FILE_BYTES} bytes")
    where = _checked(path)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield chunk

    async with httpx.AsyncClient(timeout=httpx.Timeout(NODE_TRANSFER_S, connect=NODE_CONNECT_S)) as client:
        holder, uid = await _holder(state, client, app, vol, node)
        got = await _ask(
            state,
            client,
            app,
            holder,
            "PUT",
            f"{vol}/files/{where}",
            expect=201,
            params={"force": "true" if force else "false", "uid": uid},
            headers={"content-length": length},
            content=body(),
        )
    if not isinstance(got, dict):
        raise ApiError(503, "node_unavailable", f"node {holder.name} answered no file")
    return {"node": holder.name, "path": str(got.get("path", path)), "size": int(got.get("size", length))}


@router.delete(
    "/apps/{app}/volumes/{vol}/files/{path:path}",
    status_code=204,
    responses=responses(400, 404, 409, 503),
    summary="Remove a file, link or (recursive=true) folder of the volume",
)
async def delete_file(
    app: str,
    vol: VolumeName,
    path: FilePath,
    recursive: bool = False,
    node: NodeQuery = None,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> Response:
    where = _checked(path)
    async with httpx.AsyncClient(timeout=httpx.Timeout(NODE_TRANSFER_S, connect=NODE_CONNECT_S)) as client:
        holder, uid = await _holder(state, client, app, vol, node)
        await _ask(
            state,
            client,
            app,
            holder,
            "DELETE",
            f"{vol}/files/{where}",
            expect=204,
            params={"recursive": "true" if recursive else "false", "uid": uid},
        )
    return Response(status_code=204)
