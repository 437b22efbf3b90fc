"""Every server sharing the store copies each release's image, and each queued deploy's source, from
the peer that holds it, in the background: a release outlives the server it was built on.

A builder uploads an image to the one server it talks to; until now another server fetched it only
when a node pulled it through that server (`api.peers`), so an image pulled through no other server
died with its own. Each server watches the apps (`current_image`: every release, rollbacks too) and
the queued deploys (their sources) in the store, which only servers read and write, and copies what
it lacks through `Peers`, checked as every peer fetch is.

Every live server, not a chosen second one: servers are few (a control plane of one to three, not
the nodes), the collector bounds each one's images to the releases the retention keeps, and a
server that copies is one a node can pull through at once. A chosen second would lose the image
again with its two holders, and choosing anew as servers come and go is more to get wrong.

Bounded: one copy at a time per server (a queue); a copy that fails is tried again after 1 s, then
twice as long each time up to 60 s, at most `MAX_FAILURES` times (a peer that keeps sending other
bytes, or past the layer cap, is not downloaded from forever); an archive its manifest sizes past the
layer cap is refused at once. An item that failed that often, or that no live peer holds (its holder
restarting, say), is set aside, logged, and tried again when a server appears in the servers list
(`/servers/`) or every `SET_ASIDE_RETRY_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from osless.api.errors import ApiError
from osless.api.peers import SERVERS, Fetched, Peers
from osless.api.resources import Resources
from osless.images import ImageNotFoundError, ImageStore
from osless.store import Event

__all__ = ["Replicator"]

log = logging.getLogger("osless.api.replicate")

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
RELIST_S = 2.0  # after a watch ends (the store away, or its history compacted)
# A deploy's source is copied only if no builder claimed it by then (most are claimed within a
# second): one copy of each source that waits, not one for each build.
SOURCE_WAIT_S = 5.0
MAX_FAILURES = 5  # of one item in a row, before it is set aside
SET_ASIDE_RETRY_S = 600.0  # what is set aside is tried again this often, or when a server appears


@dataclass
class Replicator:
    resources: Resources
    peers: Peers
    images: ImageStore
    source_path: Callable[[str], Path]  # where a deploy's source lives on this server
    _queue: asyncio.Queue[tuple[str, str]] = field(default_factory=asyncio.Queue)
    _pending: set[tuple[str, str]] = field(default_factory=set)  # queued, copying, or waiting to retry
    _done: set[str] = field(default_factory=set)  # images copied whole (or found whole) here
    _retry_s: dict[tuple[str, str], float] = field(default_factory=dict)
    _failures: dict[tuple[str, str], int] = field(default_factory=dict)
    _set_aside: set[tuple[str, str]] = field(default_factory=set)  # given up until a server appears
    first_retry_s: float = FIRST_RETRY_S

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._copies(), name="replica copies"),
            asyncio.create_task(self._servers(), name="replicas set aside"),
            asyncio.create_task(self._every(), name="replicas set aside, again"),
            asyncio.create_task(self._follow("apps", self._app_image, 0.0), name="replicas of images"),
            asyncio.create_task(
                self._follow("deploys", self._queued_source, SOURCE_WAIT_S), name="replicas of sources"
            ),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _app_image(obj: dict[str, Any]) -> tuple[str, str] | None:
        image = obj.get("current_image")
        return ("image", image) if isinstance(image, str) and image else None

    @staticmethod
    def _queued_source(obj: dict[str, Any]) -> tuple[str, str] | None:
        deploy = obj.get("id")
        return ("source", deploy) if obj.get("status") == "queued" and isinstance(deploy, str) else None

    async def _follow(
        self, kind: str, wanted: Callable[[dict[str, Any]], tuple[str, str] | None], wait_s: float
    ) -> None:
        """List `kind`, then watch it: what each record names that this server lacks is queued
        (`wait_s` later)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                items, revision = await self._list(kind)
                for item in items:
                    loop.call_later(wait_s, self._want, wanted(item))
                events = cast(AsyncGenerator[dict[str, Any], None], self.resources.watch(kind, revision))
                async with contextlib.aclosing(events):
                    async for ev in events:
                        changed = ev.get("object")
                        if ev.get("type") == "PUT" and isinstance(changed, dict):
                            loop.call_later(wait_s, self._want, wanted(changed))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store away, or its history compacted: listed again
                log.info("the watch of %s for replicas ended (%r): listing again", kind, e)
            await asyncio.sleep(RELIST_S)

    async def _servers(self) -> None:
        """What was set aside is tried again when a server registers (a holder back, a new peer)."""
        store = self.peers.store
        while True:
            try:
                _, revision = await store.list(SERVERS)
                events = cast(AsyncGenerator[Event, None], store.watch(SERVERS, after_revision=revision))
                async with contextlib.aclosing(events):
                    async for ev in events:
                        if ev.type == "PUT":
                            self.retry_set_aside()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store away, or its history compacted: listed again
                log.info("the watch of the servers for replicas ended (%r): listing again", e)
                self.retry_set_aside()  # a server may have come meanwhile
            await asyncio.sleep(RELIST_S)

    async def _every(self) -> None:
        """And every `SET_ASIDE_RETRY_S` all the same (a peer's bytes mended in place, say)."""
        while True:
            await asyncio.sleep(SET_ASIDE_RETRY_S)
            self.retry_set_aside()

    def retry_set_aside(self) -> None:
        items, self._set_aside = self._set_aside, set()
        if items:
            log.info("trying again %d replica copies set aside", len(items))
        for item in items:
            self._want(item)

    async def _list(self, kind: str) -> tuple[list[dict[str, Any]], int]:
        if kind == "apps":
            apps, revision = await self.resources.list_apps()
            return [a.model_dump() for a in apps], revision
        deploys, revision = await self.resources.list_deploys()
        return [d.model_dump() for d in deploys], revision

    def _want(self, item: tuple[str, str] | None) -> None:
        if item is None or item in self._pending:
            return
        if item[1] in self._done and self.images.has_image(item[1]):  # unless collected since
            return
        self._pending.add(item)
        self._queue.put_nowait(item)

    async def _copies(self) -> None:
        """One copy at a time: a server taking on a peer's releases never floods its disk or network."""
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            kind, name = item
            try:
                outcome = await (self._copy_image(name) if kind == "image" else self._copy_source(name))
            except asyncio.CancelledError:
                raise
            except ValueError as e:  # not a digest, or past the layer cap: asking again cannot help
                log.warning("copying %s %s from a peer: %s; given up", kind, name[:12], e)
                self._settle(item)
                continue
            except Exception as e:  # a disk error, a record of another shape: tried again later
                log.warning("copying %s %s from a peer failed: %r", kind, name[:12], e)
                outcome = "failed"
            if outcome == "failed":
                failures = self._failures.get(item, 0) + 1
                if failures >= MAX_FAILURES:
                    log.warning(
                        "%s %s not copied from a peer after %d tries: set aside until a server appears",
                        kind,
                        name[:12],
                        failures,
                    )
                    self._settle(item, aside=True)
                    continue
                self._failures[item] = failures
                delay = self._retry_s.get(item, self.first_retry_s)
                self._retry_s[item] = min(delay * 2, MAX_RETRY_S)
                log.info("%s %s not copied from a peer yet: trying again in %.0f s", kind, name[:12], delay)
                loop.call_later(delay, self._queue.put_nowait, item)
                continue
            if outcome == "kept":
                self._settle(item)
                if kind == "image":
                    self._done.add(name)
                continue
            log.warning(
                "%s %s is on no live server (its holder stopped before any other copied it): set aside "
                "until a server appears",
                kind,
                name[:12],
            )
            self._settle(item, aside=True)

    def _settle(self, item: tuple[str, str], *, aside: bool = False) -> None:
        """`item` no longer copying: done, or set aside (`retry_set_aside`)."""
        self._pending.discard(item)
        self._retry_s.pop(item, None)
        self._failures.pop(item, None)
        if aside:
            self._set_aside.add(item)

    async def _copy_image(self, digest: str) -> Fetched:
        """The manifest, then each layer archive it names."""
        outcome = await self.peers.fetch_manifest(digest)
        if outcome != "kept":
            return outcome
        try:
            manifest = await asyncio.to_thread(self.images.get_manifest, digest)
        except (ImageNotFoundError, ValueError):  # collected meanwhile: nothing to keep
            return "kept"
        archives = manifest.archived_layers()
        # None for an image of the release before archives: its holder makes them on a node's first
        # ask, and this server fetches them then (on a miss).
        for archive in archives.values():
            if archive.size > self.peers.max_layer_bytes:  # never downloaded up to the cap to learn it
                raise ValueError(
                    f"its layer archive {archive.sha256[:12]} is {archive.size} bytes, past this server's "
                    f"cap of {self.peers.max_layer_bytes}"
                )
        for archive in archives.values():
            outcome = await self.peers.fetch_archive(archive.sha256)
            if outcome != "kept":
                return outcome
        log.info("image %s copied from a peer", digest[:12])
        return "kept"

    async def _copy_source(self, deploy_id: str) -> Fetched:
        """A queued deploy's source, while it is still queued (any builder claims it from here)."""
        try:
            if (await self.resources.get_deploy(deploy_id)).status != "queued":
                return "kept"  # claimed or ended meanwhile: no longer needed
        except ApiError:  # deleted with its app
            return "kept"
        return await self.peers.fetch_source(deploy_id, self.source_path(deploy_id))
