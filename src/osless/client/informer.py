"""List, then watch from the list's revision; start again on any break (level-triggered clients)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from osless.client.api import ApiError, AsyncApi

__all__ = ["Informer"]

log = logging.getLogger("osless.informer")


class Informer:
    """Keeps `items` (name -> object) equal to a resource list, calling `on_change` after each change."""

    def __init__(
        self,
        api: AsyncApi,
        path: str,
        key: Callable[[dict[str, Any]], str],
        on_change: Callable[[], Awaitable[None]] | None = None,
        **params: Any,
    ) -> None:
        self.api = api
        self.path = path
        self.key = key
        self.params = params
        self.on_change = on_change
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                listed = await self.api.get(self.path, **self.params)
                self.items = {self.key(o): o for o in listed["items"]}
                self.synced.set()
                await self._changed()
                backoff = 0.1
                async for ev in self.api.stream(
                    self.path, watch="true", revision=listed["revision"], **self.params
                ):
                    if ev["type"] == "PUT":
                        self.items[self.key(ev["object"])] = ev["object"]
                    elif ev["type"] == "DELETE":
                        if self.items.pop(ev["name"], None) is None:
                            continue
                    elif ev["type"] == "ERROR":
                        break
                    else:
                        continue
                    await self._changed()
            except ApiError as e:
                log.debug("informer %s: %s", self.path, e)
            except Exception:  # a bug in a handler must not end the watch for good
                log.exception("informer %s failed; listing again", self.path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()
