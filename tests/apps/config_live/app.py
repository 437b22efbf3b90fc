"""Test app for tests/test_runtime_config.py: settings read live, hooks that record what changed."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import osless

app = osless.App("config-live")
settings = app.config(greeting=osless.Field(str, default="hi"), n=int, token=osless.Secret)
# Read at import: the zygote applies its initial config before importing the app.
AT_IMPORT = settings.as_dict()
sync_seen: list[dict[str, Any]] = []
async_seen: list[dict[str, Any]] = []


@app.on_config_change
def record(changed: dict[str, Any]) -> None:
    sync_seen.append(changed)


@app.on_config_change()
async def arecord(changed: dict[str, Any]) -> None:
    await asyncio.sleep(0)
    async_seen.append(changed)


@app.on_config_change
def broken(changed: dict[str, Any]) -> None:
    raise RuntimeError("sync hook failure")


@app.on_config_change
async def abroken(changed: dict[str, Any]) -> None:
    raise RuntimeError("async hook failure")


@app.function()
def read(event: Any, ctx: osless.Context) -> dict[str, Any]:
    return {"greeting": settings.greeting, "n": settings.n, "token": settings.token, "pid": os.getpid()}


@app.function()
def shown(event: Any, ctx: osless.Context) -> dict[str, Any]:
    return {"repr": repr(settings), "as_dict": settings.as_dict(), "at_import": AT_IMPORT}


@app.function()
def seen(event: Any, ctx: osless.Context) -> dict[str, Any]:
    return {"sync": sync_seen, "async": async_seen}
