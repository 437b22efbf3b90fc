"""List, then watch from the list's revision; start again on any break (level-triggered clients).

What was listed stays while the API cannot be reached: a failed list or watch never clears
`items`, so a client keeps acting on the last state it knew (a gateway keeps routing) until a new
list replaces it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, ValidationError

from osless.client.api import ApiError, AsyncApi

__all__ = ["Informer", "ModelInformer"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("osless.informer")

# The API sends a bookmark every 10 s on an idle watch: a stream silent for this long is dead (the
# API frozen, or a connection lost without a reset), and is listed again.
WATCH_IDLE_S = 35.0


class BaseInformer(Generic[T]):
    """Keeps `items` (name -> object) equal to a resource list, calling `on_change` after each change."""

    def __init__(
        self,
        api: AsyncApi,
        path: str,
        key: Callable[[T], str],
        on_change: Callable[[], Awaitable[None]] | None = None,
        **params: Any,
    ) -> None:
        self.api = api
        self.path = path
        self.key = key
        self.params = params
        self.on_change = on_change
        self.items: dict[str, T] = {}
        self.synced = asyncio.Event()
        self.down_since: float | None = None  # wall clock: the list or watch failing since then
        self._relist = asyncio.Event()
        self._listed = asyncio.Event()  # set (and replaced) at each list applied

    async def relist(self) -> None:
        """List again now (not trusting the watch to have delivered everything), and return once
        that list is applied."""
        listed = self._listed
        self._relist.set()
        await listed.wait()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            self._relist.clear()
            cycle = asyncio.create_task(self._list_and_watch())
            relist = asyncio.create_task(self._relist.wait())
            try:
                await asyncio.wait([cycle, relist], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (cycle, relist):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            if relist.done() and not relist.cancelled():
                continue
            if cycle.done() and not cycle.cancelled() and cycle.result():
                backoff = 0.1  # it had listed: the next failure starts the backoff again
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _list_and_watch(self) -> bool:
        """One list and the watch after it, until the stream ends; whether the list succeeded."""
        listed_ok = False
        try:
            listed = await self.api.get(self.path, **self.params)
            parsed = (self._read(o) for o in listed["items"])
            self.items = {self.key(o): o for o in parsed if o is not None}
            listed_ok = True
            self.down_since = None
            self.synced.set()
            self._listed.set()
            self._listed = asyncio.Event()
            await self._changed()
            stream = self.api.stream(self.path, watch="true", revision=listed["revision"], **self.params)
            events = cast(AsyncGenerator[dict[str, Any], None], stream)
            try:
                await self._follow(events)
            finally:
                await events.aclose()
        except (ApiError, TimeoutError) as e:
            log.debug("informer %s: %s", self.path, e)
            if self.down_since is None:
                self.down_since = time.time()
        except Exception:  # a bug in a handler must not end the watch for good
            log.exception("informer %s failed; listing again", self.path)
        return listed_ok

    async def _follow(self, events: AsyncGenerator[dict[str, Any], None]) -> None:
        while True:
            try:
                async with asyncio.timeout(WATCH_IDLE_S):  # in this task: the stream stays its own
                    ev = await anext(events)
            except StopAsyncIteration:
                return
            if ev["type"] == "PUT":
                obj = self._read(ev["object"])
                if obj is None:
                    continue
                self.items[self.key(obj)] = obj
            elif ev["type"] == "DELETE":
                if self.items.pop(ev["name"], None) is None:
                    continue
            elif ev["type"] == "ERROR":
                return
            else:
                continue
            await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    def read(self, obj: dict[str, Any]) -> T:
        """An object as the API answered it, as `items` holds it."""
        raise NotImplementedError

    def _read(self, obj: dict[str, Any]) -> T | None:
        try:
            return self.read(obj)
        except (ValidationError, LookupError, TypeError) as e:
            # One record this client cannot read must not keep it from following the others.
            log.warning("informer %s: an object skipped, unreadable: %s", self.path, str(e)[:300])
            return None


class Informer(BaseInformer[dict[str, Any]]):
    """Objects as the API answers them: JSON dicts."""

    def read(self, obj: dict[str, Any]) -> dict[str, Any]:
        return obj


class ModelInformer(BaseInformer[M]):
    """Objects read into their contract (`osless.contracts`): typed, checked once as they arrive."""

    def __init__(
        self,
        api: AsyncApi,
        path: str,
        model: type[M],
        key: Callable[[M], str],
        on_change: Callable[[], Awaitable[None]] | None = None,
        **params: Any,
    ) -> None:
        super().__init__(api, path, key, on_change, **params)
        self.model = model

    def read(self, obj: dict[str, Any]) -> M:
        return self.model.model_validate(obj)
