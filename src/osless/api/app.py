"""The REST API: FastAPI app assembly, the auth wall, body limits and the startup repair."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from osless import __version__
from osless.api.auth import require_token
from osless.api.errors import error_body, install_error_handlers
from osless.api.models import now
from osless.api.openapi import install_openapi
from osless.api.routes import apps, config, deploys, instances, invoke, logs, system
from osless.api.state import ApiState

__all__ = ["create_app"]


class BodyLimit:
    """Answers 413 before reading past the limit: uploads get `upload`, everything else `body`."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/deploys"
        limit = self.state.max_upload_bytes if is_upload else self.state.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(send, limit)
            return
        seen = 0
        responded = rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    # Answer now; the app then sees a disconnect and whatever it sends is dropped.
                    rejected = True
                    if not responded:
                        await self._reject(send, limit)
                    return {"type": "http.disconnect"}
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal responded
            if rejected:
                return
            if msg["type"] == "http.response.start":
                responded = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not rejected:
                raise

    @staticmethod
    async def _reject(send: Send, limit: int) -> None:
        body = json.dumps(
            error_body("too_large", f"request body exceeds the limit of {limit} bytes")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(state: ApiState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A build cut off by a crash or kill -9 never finishes: say so instead of leaving it "building".
        items, _rev = await state.resources.list_deploys()
        for d in items:
            if d.status == "building" and d.id not in state.builds:
                d.status, d.error, d.finished_at = (
                    "failed",
                    "interrupted: the platform restarted during the build",
                    now(),
                )
                await state.resources.put_deploy(d)
        yield
        for task in list(state.builds.values()):
            task.cancel()
        await state.http.aclose()

    app = FastAPI(
        title="osless",
        version=__version__,
        lifespan=lifespan,
        description="The system calls of osless: apps, deploys, releases, instances, logs.",
    )
    app.state.osless = state
    install_error_handlers(app)
    install_openapi(app)
    secured = [Depends(require_token)]
    for module in (apps, config, deploys, instances, invoke, logs, system):
        app.include_router(module.router, prefix="/v1", dependencies=secured)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(BodyLimit, state=state)
    return app
