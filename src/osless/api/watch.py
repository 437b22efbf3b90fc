"""List-then-watch: a list answer carries the revision; `watch=true&revision=N` streams what follows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from osless.api.resources import Resources
from osless.store import Compacted

__all__ = ["watch_response"]

BOOKMARK_S = 10.0


def watch_response(
    resources: Resources,
    kind: str,
    revision: int,
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for ev in resources.watch(kind, revision):
                    await queue.put(ev)
            except Compacted:
                await queue.put({"type": "ERROR", "code": "compacted", "revision": revision})

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
                if keep is None or keep(ev):
                    yield (json.dumps(ev) + "\n").encode()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return StreamingResponse(stream(), media_type="application/x-ndjson")
