"""The REST API: FastAPI app assembly, the guard in front, body limits, the startup repair and upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from osless import __version__
from osless.api import audit
from osless.api.auth import Require
from osless.api.errors import error_body, install_error_handlers
from osless.api.guard import Guard
from osless.api.openapi import install_openapi
from osless.api.routes import (
    apps,
    attach,
    builds,
    config,
    debug,
    deploys,
    functions,
    images,
    instances,
    invocations,
    invoke,
    lambda_invoke,
    leaders,
    logs,
    queues,
    retention,
    runs,
    system,
    tokens,
    traces,
    usage,
    volumes,
)
from osless.api.routes import audit as audit_routes
from osless.api.routes import metrics as metrics_routes
from osless.api.routes import schedules as schedule_routes
from osless.api.routes.deploys import fail_orphaned_builds
from osless.api.state import ApiState
from osless.api.ui import links as dashboard_links
from osless.api.ui.gate import UiGate

__all__ = ["create_app"]

log = logging.getLogger("osless.api")

UPKEEP_S = 60.0
BUILD_SWEEP_S = 2.0
# The one route whose body may be a file of volumes.MAX_FILE_BYTES, matched whole: an app may be named
# "volumes", and other routes read their whole body into memory before any permission is checked.
_VOLUME_UPLOAD = re.compile(r"/v1/apps/[^/]+/volumes/[^/]+/files/.+")
EXPIRED_TOKEN_GRACE_S = 86400.0  # an expired token answers "token expired" for a day, then is collected


class BodyLimit:
    """Answers 413 before reading past the limit: uploads get `upload`, everything else `body`."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/")
        is_upload = scope["method"] == "POST" and path == "/v1/deploys"
        limit = self.state.max_upload_bytes if is_upload else self.state.max_body_bytes
        if scope["method"] == "PUT" and path.startswith("/v1/builds/") and "/layers/" in path:
            limit = self.state.max_layer_bytes  # a builder's layer archive (routes/builds.py)
        if scope["method"] == "PUT" and _VOLUME_UPLOAD.fullmatch(path):
            limit = volumes.MAX_FILE_BYTES  # a file uploaded into a volume (routes/volumes.py)
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


async def _upkeep(state: ApiState) -> None:
    """Now and then: tokens' last use written down, expired tokens collected, the audit log pruned."""
    while True:
        try:
            await state.tokens.flush_last_used()
            await state.tokens.collect_expired(EXPIRED_TOKEN_GRACE_S)
            await audit.prune(state.resources.store)
        except Exception:  # a failed round is retried at the next
            log.exception("API upkeep failed")
        await asyncio.sleep(UPKEEP_S)


async def _sweep_builds(state: ApiState) -> None:
    while True:
        with contextlib.suppress(Exception):  # the next round looks again
            await fail_orphaned_builds(state)
        await asyncio.sleep(BUILD_SWEEP_S)


def _check_permissions(router: APIRouter) -> None:
    """Every API route declares the permission it needs: a route without one would be open to any
    token, so the API refuses to start instead."""
    for route in router.routes:
        if isinstance(route, APIRoute) and not any(
            isinstance(d.call, Require) for d in route.dependant.dependencies
        ):
            raise RuntimeError(
                f"{route.path} ({', '.join(sorted(route.methods or ()))}) declares no permission"
            )


def create_app(state: ApiState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A build cut off by a builder's crash or kill -9 never finishes: failed once that builder's
        # lease is gone (every server looks, every 2 s), never while a live builder holds it.
        await fail_orphaned_builds(state)
        upkeep = asyncio.create_task(_upkeep(state), name="API upkeep")
        sweep = asyncio.create_task(_sweep_builds(state), name="orphaned builds")
        yield
        for task in (upkeep, sweep):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
    routers = (
        apps,
        attach,
        builds,
        config,
        deploys,
        debug,
        functions,
        images,
        instances,
        invoke,
        invocations,
        leaders,
        logs,
        retention,
        runs,
        system,
        tokens,
        volumes,
        audit_routes,
        schedule_routes,
        traces,
        queues,
        usage,
        dashboard_links,
    )
    for module in routers:
        _check_permissions(module.router)
        app.include_router(module.router, prefix="/v1")
    # AWS's own path, as boto3's `lambda` client calls it (with `endpoint_url=` the API).
    _check_permissions(lambda_invoke.router)
    app.include_router(lambda_invoke.router)
    _check_permissions(metrics_routes.router)
    app.include_router(metrics_routes.router)  # `/metrics`, where scrapers look

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(BodyLimit, state=state)
    app.add_middleware(Guard, state=state)  # it runs first, before anything reads the request
    app.add_middleware(UiGate, state=state)  # but the dashboard's pages and session cookie (api/ui/gate.py)
    return app
