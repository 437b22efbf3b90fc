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
twice as long each time up to 60 s, while a live peer may hold it; when every live peer answers that
it has none (or none is live), it is given up, and logged.
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
from osless.api.peers import Fetched, Peers
from osless.api.resources import Resources
from osless.images import ImageNotFoundError, ImageStore

__all__ = ["Replicator"]

log = logging.getLogger("osless.api.replicate")

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
RELIST_S = 2.0  # after a watch ends (the store away, or its history compacted)
# A deploy's source is copied only if no builder claimed it by then (most are claimed within a
# second): one copy of each source that waits, not one for each build.
SOURCE_WAIT_S = 5.0


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

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._copies(), name="replica copies"),
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
            except ValueError as e:  # not a digest, or not a manifest: asking again cannot help
                log.warning("copying %s %s from a peer: %s; given up", kind, name[:12], e)
                self._pending.discard(item)
                continue
            except Exception as e:  # a disk error, a record of another shape: tried again later
                log.warning("copying %s %s from a peer failed: %r", kind, name[:12], e)
                outcome = "failed"
            if outcome == "failed":
                delay = self._retry_s.get(item, FIRST_RETRY_S)
                self._retry_s[item] = min(delay * 2, MAX_RETRY_S)
                log.info("%s %s not copied from a peer yet: trying again in %.0f s", kind, name[:12], delay)
                loop.call_later(delay, self._queue.put_nowait, item)
                continue
            self._pending.discard(item)
            self._retry_s.pop(item, None)
            if outcome == "kept":
                if kind == "image":
                    self._done.add(name)
                continue
            log.warning(
                "%s %s is on no live server (its holder stopped before any other copied it): given up",
                kind,
                name[:12],
            )

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
