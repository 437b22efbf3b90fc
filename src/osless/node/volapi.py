"""The node API's volume routes: what `osless volumes` reaches, through the API, on the node holding a
volume. Only the API calls them, with a token it made for this node and app (`volumes` role, a
minute); the file work itself is `node.volfiles`, beneath the volume's root whatever the app planted.

Each takes `?uid=`, the app's uid as the API knows it: a volume left by an earlier app of the same
name (deleted, not yet put away here) answers as none, never with the old app's data.

    GET    /volumes/apps/{app}                          the app's volumes here: size, used, mounted
    GET    /volumes/apps/{app}/{vol}/entries?path=P     a folder's entries (or the one file)
    GET    /volumes/apps/{app}/{vol}/files/{path}       a file's bytes
    PUT    /volumes/apps/{app}/{vol}/files/{path}       a file written (Content-Length; ?force=true)
    DELETE /volumes/apps/{app}/{vol}/files/{path}       removed (?recursive=true for a folder)
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from osless.node import volfiles
from osless.node.volfiles import FileError
from osless.sdk.app import VOLUME_RE

if TYPE_CHECKING:
    from osless.node.api import Callers
    from osless.node.volumes import Volumes

__all__ = ["MAX_FILE_BYTES", "routes"]

MAX_FILE_BYTES = 4 * 1024 * 1024 * 1024  # one upload, besides the volume's free space
_APP = re.compile(r"[a-z0-9][a-z0-9.-]{0,80}")
_UID = re.compile(r"[0-9]{1,10}")
_TRUE = ("true", "1")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def routes(volumes: Volumes, callers: Callers) -> list[Route]:
    """The routes, over the node agent's `volumes`."""

    async def checked(request: Request) -> tuple[str, str | None, int] | Response:
        app, vol = request.path_params["app"], request.path_params.get("vol")
        if not _APP.fullmatch(app):
            return _error(400, "invalid_request", f"{app[:100]!r} is not an app name")
        if vol is not None and not VOLUME_RE.fullmatch(vol):
            return _error(400, "invalid_request", f"{vol[:100]!r} is not a volume name")
        refused = await callers.check(request, "volumes", app)
        if refused is not None:
            return refused
        uid = request.query_params.get("uid", "")
        if not _UID.fullmatch(uid):
            return _error(400, "invalid_request", "uid (the app's, as the API knows it) is required")
        return app, vol, int(uid)

    async def opened(app: str, vol: str, uid: int) -> tuple[int, int] | Response:
        try:
            return await volumes.open_root(app, vol, uid)
        except FileNotFoundError as e:
            return _error(404, "not_found", str(e))
        except Exception as e:  # a mount that failed: said, never a 500 with no words
            return _error(503, "unavailable", f"volume {vol} of {app} could not be opened here: {e}")

    def guarded(
        handler: Callable[[Request, str, str, int, list[str]], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            found = await checked(request)
            if isinstance(found, Response):
                return found
            app, vol, uid = found
            assert vol is not None
            path = request.path_params.get("path", request.query_params.get("path", ""))
            try:
                return await handler(request, app, vol, uid, volfiles.parts(path))
            except FileError as e:
                return _error(e.status, e.code, e.message)

        return route

    async def list_volumes(request: Request) -> Response:
        found = await checked(request)
        if isinstance(found, Response):
            return found
        return JSONResponse({"items": await volumes.held(found[0], found[2])})

    async def entries(request: Request, app: str, vol: str, uid: int, names: list[str]) -> Response:
        root = await opened(app, vol, uid)
        if isinstance(root, Response):
            return root
        fd, _ = root
        try:
            found, more = await asyncio.to_thread(volfiles.entries, fd, names)
        finally:
            os.close(fd)
        return JSONResponse({"items": found, "truncated": more, "limit": volfiles.MAX_ENTRIES})

    async def download(request: Request, app: str, vol: str, uid: int, names: list[str]) -> Response:
        root = await opened(app, vol, uid)
        if isinstance(root, Response):
            return root
        fd, _ = root
        try:
            st = os.fstatvfs(fd)
            file, size = await asyncio.to_thread(volfiles.reader, fd, names, st.f_blocks * st.f_frsize)
        finally:
            os.close(fd)  # the open file keeps the filesystem alive meanwhile

        # A file object: closed by the collector too if the answer is never sent (its client gone).
        opened_file = os.fdopen(file, "rb", buffering=0)

        async def body() -> AsyncIterator[bytes]:
            try:
                chunks = volfiles.read_chunks(opened_file.fileno(), size)
                while chunk := await asyncio.to_thread(next, chunks, b""):
                    yield chunk
            finally:
                opened_file.close()

        return StreamingResponse(
            body(), media_type="application/octet-stream", headers={"x-osless-size": str(size)}
        )

    async def upload(request: Request, app: str, vol: str, uid: int, names: list[str]) -> Response:
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            return _error(400, "length_required", "send the file with a Content-Length")
        if int(length) > MAX_FILE_BYTES:
            return _error(413, "too_large", f"a file uploaded may be at most {MAX_FILE_BYTES} bytes")
        force = request.query_params.get("force", "false").lower() in _TRUE
        root = await opened(app, vol, uid)
        if isinstance(root, Response):
            return root
        fd, _ = root
        try:
            st = os.fstatvfs(fd)
            if int(length) > st.f_bavail * st.f_frsize:
                return _error(
                    413,
                    "no_space",
                    f"volume {vol} has {st.f_bavail * st.f_frsize} bytes free; the file is {length} bytes",
                )
            writer = await asyncio.to_thread(volfiles.Writer.start, fd, names, uid, force=force)
        finally:
            os.close(fd)
        try:
            got = 0
            async for chunk in request.stream():
                got += len(chunk)
                if got > int(length):
                    return _error(400, "invalid_request", "the body is longer than its Content-Length")
                await asyncio.to_thread(writer.write, chunk)
            if got != int(length):
                return _error(400, "invalid_request", f"the body ended after {got} of {length} bytes")
            await asyncio.to_thread(writer.commit, force=force)
        finally:
            await asyncio.to_thread(writer.close)
        return JSONResponse({"path": "/".join(names), "size": got}, status_code=201)

    async def remove(request: Request, app: str, vol: str, uid: int, names: list[str]) -> Response:
        recursive = request.query_params.get("recursive", "false").lower() in _TRUE
        root = await opened(app, vol, uid)
        if isinstance(root, Response):
            return root
        fd, _ = root
        try:
            await asyncio.to_thread(volfiles.remove, fd, names, recursive=recursive)
        finally:
            os.close(fd)
        return Response(status_code=204)

    return [
        Route("/volumes/apps/{app}", list_volumes, methods=["GET"]),
        Route("/volumes/apps/{app}/{vol}/entries", guarded(entries), methods=["GET"]),
        Route("/volumes/apps/{app}/{vol}/files/{path:path}", guarded(download), methods=["GET"]),
        Route("/volumes/apps/{app}/{vol}/files/{path:path}", guarded(upload), methods=["PUT"]),
        Route("/volumes/apps/{app}/{vol}/files/{path:path}", guarded(remove), methods=["DELETE"]),
    ]
