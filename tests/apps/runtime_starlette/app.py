"""Test app for tests/test_runtime.py: functions of every outcome and a Starlette (ASGI) web app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import osless

app = osless.App("runtime-starlette")


@app.function()
def greet(event: Any, ctx: osless.Context) -> dict[str, Any]:
    print(f"greet stdout {event['name']}")
    print(f"greet stderr {event['name']}", file=sys.stderr)
    return {
        "hello": event["name"],
        "request_id": ctx.request_id,
        "app": ctx.app,
        "fn": ctx.function,
        "remaining_ms": ctx.remaining_ms(),
        "pid": os.getpid(),
    }


@app.function()
async def agreet(event: Any, ctx: osless.Context) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"async": True, "event": event}


@app.function()
def boom(event: Any, ctx: osless.Context) -> None:
    raise ValueError("kaboom")


@app.function()
def own_timeout(event: Any, ctx: osless.Context) -> None:
    raise TimeoutError("the database was slow")


@app.function()
def a_set(event: Any, ctx: osless.Context) -> set[int]:
    return {1, 2}


@app.function()
def nested_set(event: Any, ctx: osless.Context) -> dict[str, Any]:
    return {"ok": {1, 2}}


@app.function(timeout_s=0.5)
def slow(event: Any, ctx: osless.Context) -> str:
    time.sleep(1.5)
    return "late"


@app.function(timeout_s=0.5)
async def aslow(event: Any, ctx: osless.Context) -> str:
    await asyncio.sleep(1.5)
    return "late"


@app.function()
def env(event: Any, ctx: osless.Context) -> str | None:
    return os.environ.get(event)


@app.function()
def exit3(event: Any, ctx: osless.Context) -> None:
    sys.exit(3)


@app.function()
async def aexit3(event: Any, ctx: osless.Context) -> None:
    sys.exit(3)


@app.function()
def hard_exit3(event: Any, ctx: osless.Context) -> None:
    os._exit(3)


@app.web()
def web() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"lifespan_pid": os.getpid()}  # runs in the instance, after the fork

    async def home(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "path": request.url.path,
                "pid": os.getpid(),
                "lifespan_pid": request.state.lifespan_pid,
                "client": request.client and request.client.host,
                "scheme": request.url.scheme,
                "root_path": request.scope["root_path"],
            }
        )

    produced = {"chunks": 0}

    async def flood(request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:  # never waits of its own accord
            for _ in range(64):
                produced["chunks"] += 1
                yield b"x" * (1024 * 1024)

        return StreamingResponse(chunks())

    async def flooded(request: Request) -> JSONResponse:
        return JSONResponse(produced)

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("echo " + await websocket.receive_text())
        await websocket.close()

    routes = [Route("/flood", flood), Route("/flooded", flooded), Route("/{path:path}", home)]
    return Starlette(routes=[*routes, WebSocketRoute("/ws", echo)], lifespan=lifespan)
