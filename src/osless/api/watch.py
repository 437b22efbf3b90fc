"""List-then-watch: a list answer carries the revision; `watch=true&revision=N` streams what follows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from osless.api.errors import ApiError
from osless.api.resources import Resources
from osless.store import Compacted

__all__ = ["list_or_watch", "watch_response"]

BOOKMARK_S = 10.0


def watch_response(
    resources: Resources,
    kind: str,
    revision: int,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    shape: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None,
) -> StreamingResponse:
    """`keep` filters events; `shape` (async: it may ask the store) gives the event to send instead,
    or None for none; `view` reshapes each event's object before it is sent."""

    async def stream() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for ev in resources.watch(kind, revision):
                    await queue.put(ev)
            except Compacted:
                await queue.put({"type": "ERROR", "code": "compacted", "revision": revision})
            except Exception as e:  # the client must learn the stream is over, and list again
                await queue.put(
                    {"type": "ERROR", "code": "watch_failed", "message": str(e), "revision": revision}
                )

        # The store's watch runs in its own task so a bookmark timeout never cancels it midway.
        task = asyncio.create_task(pump())
        last = revision
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), BOOKMARK_S)
                except TimeoutError:
                    # keeps idle connections alive and lets clients resume close to now
                    yield (json.dumps({"type": "BOOKMARK", "revision": last}) + "\n").encode()
                    continue
                if ev["type"] == "ERROR":
                    yield (json.dumps(ev) + "\n").encode()
                    return
                last = ev["revision"]
                if shape is not None:
                    shaped = await shape(ev)
                    if shaped is None:
                        continue
                    ev = shaped
                if keep is None or keep(ev):
                    if view is not None and ev["object"] is not None:
                        ev["object"] = view(ev["object"])
                    yield (json.dumps(ev) + "\n").encode()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def list_or_watch(
    resources: Resources,
    kind: str,
    *,
    watch: bool,
    revision: int | None,
    items: Callable[[], Awaitable[tuple[Sequence[BaseModel], int]]],
    keep: Callable[[dict[str, Any]], bool] | None = None,
    view: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    shape: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]] | None = None,
) -> Any:
    """The answer of every list endpoint: the items and their revision, or the changes after one."""
    if not watch:
        listed, rev = await items()
        shaped = [x.model_dump() for x in listed]
        return {"items": [view(x) for x in shaped] if view else shaped, "revision": rev}
    current = await resources.store.revision()
    if revision is None:
        revision = current
    elif revision > current:
        raise ApiError(
            400,
            "bad_revision",
            f"revision {revision} is ahead of the store ({current}): "
            "list first, then watch from the revision the list gave",
        )
    return watch_response(resources, kind, revision, keep, view, shape)
