"""Images for nodes: a manifest's exact bytes, a layer's archive, by digest.

A node checks what it gets: sha256(manifest bytes) is the image digest the instance record names,
and each layer archive's sha256 is the one the manifest names. For the node role (and admin) only:
an image holds an app's code.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import FileResponse, Response
from pydantic import Field

from osless.api.auth import Caller, node_of, require
from osless.api.errors import ApiError, responses
from osless.api.models import DIGEST_PATTERN, Body, Integer
from osless.api.runs import images_run_on
from osless.api.state import ApiState, get_state
from osless.images import ImageNotFoundError

router = APIRouter(tags=["images"])

Digest = Annotated[str, Path(pattern=DIGEST_PATTERN, description="64 lowercase hex digits: a sha256")]
TAR = "application/x-tar"


class LayerArchive(Body):
    sha256: str = Field(pattern=DIGEST_PATTERN)
    size: Integer = Field(ge=0)


class LayerArchives(Body):
    """Each layer of an image (`code`, `deps`) as a node pulls it from `GET /v1/layers/{sha256}`."""

    layers: dict[str, LayerArchive]


async def _placed_images(state: ApiState, caller: Caller) -> set[str] | None:
    """The images a node token may pull: those of the instances placed on its node and of the
    commands it runs (an image holds its app's code). None: any (the admin)."""
    if caller.role != "node":
        return None
    node = node_of(caller) or ""
    instances, _ = await state.resources.list_instances(node=node)
    # And those of the one-off commands it runs (`osless run`, release steps: `api.runs`).
    return {i.image for i in instances} | (await images_run_on(state, node) if node else set())


def _not_placed(what: str) -> ApiError:
    return ApiError(
        403, "not_placed", f"{what} belongs to no instance placed on this node: a node pulls what it runs"
    )


async def _may_pull_layer(state: ApiState, caller: Caller, sha256: str) -> bool:
    placed = await _placed_images(state, caller)
    if placed is None:
        return True
    for digest in placed:
        try:
            manifest = await asyncio.to_thread(state.images.get_manifest, digest)
        except (ImageNotFoundError, ValueError):
            continue
        if manifest.layer_archives is not None:
            shas = {manifest.layer_archives.code.sha256, manifest.layer_archives.deps.sha256}
        else:  # an image of the previous release: archives made lazily
            try:
                shas = {
                    (await asyncio.to_thread(state.images.layer_archive, layer)).sha256
                    for layer in (manifest.layers.code, manifest.layers.deps)
                }
            except (FileNotFoundError, ValueError):
                continue
        if sha256 in shas:
            return True
    return False


async def _fetch_image(state: ApiState, caller: Caller, digest: str) -> None:
    """An image built through another server sharing the store: fetched from it first. Never for a
    peer's own ask (each would ask the other back)."""
    if state.peers is not None and caller.role != "peer":
        await state.peers.manifest(digest)


def _no_image(digest: str) -> ApiError:
    return ApiError(
        404,
        "image_not_found",
        f"no image {digest} is stored here nor on a live peer server; it was never built or was collected",
    )


@router.get(
    "/images/{digest}",
    response_class=Response,
    responses={
        200: {
            "description": "The image manifest's exact bytes: their sha256 is the digest",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **responses(403, 404, 422),
    },
    summary="An image manifest, byte for byte (for nodes)",
)
async def get_image(
    digest: Digest, state: ApiState = Depends(get_state), caller: Caller = require("pull")
) -> Response:
    placed = await _placed_images(state, caller)
    if placed is not None and digest not in placed:
        raise _not_placed(f"image {digest}")
    await _fetch_image(state, caller, digest)
    try:
        data = await asyncio.to_thread(state.images.manifest_bytes, digest)
    except ImageNotFoundError:
        raise _no_image(digest) from None
    return Response(data, media_type="application/json")


@router.get(
    "/images/{digest}/layers",
    response_model=LayerArchives,
    responses=responses(403, 404, 422),
    summary="The sha256 and size of each layer's archive (for nodes; images of the previous release)",
)
async def get_image_layers(
    digest: Digest, state: ApiState = Depends(get_state), caller: Caller = require("pull")
) -> Any:
    """Images built since archives exist carry this in their manifest, under the image digest; an
    image of the previous release does not, and its archives are made on the first ask."""
    placed = await _placed_images(state, caller)
    if placed is not None and digest not in placed:
        raise _not_placed(f"image {digest}")
    images = state.images
    await _fetch_image(state, caller, digest)
    try:
        manifest = await asyncio.to_thread(images.get_manifest, digest)
    except (ImageNotFoundError, ValueError):
        raise _no_image(digest) from None
    if manifest.layer_archives is not None:
        return {"layers": manifest.layer_archives.model_dump()}
    try:
        made = {
            name: (await asyncio.to_thread(images.layer_archive, layer)).to_json()
            for name, layer in manifest.layers.model_dump().items()
        }
    except (FileNotFoundError, ValueError):
        raise ApiError(
            404,
            "layer_not_found",
            f"a layer of image {digest} is no longer stored here; deploy the app again",
        ) from None
    return {"layers": made}


@router.get(
    "/layers/{sha256}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The layer's archive (an uncompressed tar); its sha256 is the path's",
            "content": {TAR: {"schema": {"type": "string", "format": "binary"}}},
        },
        **responses(403, 404, 422),
    },
    summary="A layer's archive, streamed (for nodes)",
)
async def get_layer(
    sha256: Digest, state: ApiState = Depends(get_state), caller: Caller = require("pull")
) -> FileResponse:
    if not await _may_pull_layer(state, caller, sha256):
        raise _not_placed(f"layer {sha256}")
    path = state.images.archive_path(sha256)
    if not path.is_file() and state.peers is not None and caller.role != "peer":
        await state.peers.archive(sha256)
    if not path.is_file():
        raise ApiError(
            404,
            "layer_not_found",
            f"no layer archive {sha256} is stored here; it was never built here or was collected",
        )
    return FileResponse(path, media_type=TAR)
