"""The collector: what the retention no longer keeps is deleted, records first, then files.

One pass: old deploy records and their build logs; old releases (never the current one, nor one with
instances); logs of instances long gone; then, mark and sweep, the image manifests, layer archives
and lock files that no kept release names and that are older than the grace period; last, the uv
caches and lock folders that builds in the API's own process left, before builders were processes
of their own, of uids no app has any more. It runs in the API's process rather than as a controller
because the image store and the log folders are on the API's disk. Each pass ends by writing
`/collected`: builders watch it (`GET /v1/builds/kept`) and collect their own stores by what it keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from osless.api.buildlog import BuildLog
from osless.api.models import Body, Deploy, Integer, Release
from osless.images import collect_uid_folders, sha256_hex
from osless.logs import ACCESS_SUFFIX
from osless.store import Conflict

if TYPE_CHECKING:
    from osless.api.state import ApiState

__all__ = ["COLLECTED_KEY", "Collection", "Collector", "Kept", "Retention"]

log = logging.getLogger("osless.collector")

RETENTION_KEY = "/retention"
COLLECTED_KEY = "/collected"  # written at the end of each pass: its revision tells builders to collect
DAY_S = 86_400.0


class Retention(Body):
    """How long what the platform makes is kept. Fields not given take their defaults."""

    deploys_days: float = Field(
        default=30.0, ge=0, le=3650, description="deploy records and their build logs are kept this long"
    )
    deploys_per_app: Integer = Field(
        default=100, ge=1, le=10_000, description="and at most this many of them per app, the newest"
    )
    releases_per_app: Integer = Field(
        default=10,
        ge=1,
        le=10_000,
        description="releases kept per app, the newest; the current one and any with instances are kept too",
    )
    instance_logs_days: float = Field(
        default=7.0, ge=0, le=3650, description="logs of instances that no longer exist are kept this long"
    )
    grace_s: float = Field(
        default=3600.0,
        ge=0,
        le=30 * DAY_S,
        description="image layers, manifests and lock files younger than this are never collected",
    )
    interval_s: float = Field(default=3600.0, ge=1, le=7 * DAY_S, description="how often the collector runs")


class Collection(BaseModel):
    """What one pass deleted."""

    deploys: int = 0
    releases: int = 0
    logs: int = 0  # log files
    manifests: int = 0
    layers: int = 0
    locks: int = 0
    archives: int = 0  # of layers, which nodes pull
    bytes_freed: int = 0  # by the files deleted from the image store and the log folders
    images_deferred: bool = Field(
        default=False, description="a build was running: the image store is swept on a later pass"
    )
    started_at: float = 0.0
    seconds: float = 0.0


class Kept(BaseModel):
    """What the retention keeps now, by which a builder collects its own store (numbers only)."""

    collection: int = Field(description="the revision of the last pass: `after` of the next ask")
    images: list[str] = Field(description="image digests kept releases and instances name")
    locks: list[str] = Field(description="the sha256 of the locks of kept releases")
    uids: list[int] = Field(description="the uids of apps that exist, or were just named")
    grace_s: float


class Collector:
    """Runs a pass every `interval_s`, or now (`collect`); one pass at a time."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._unreadable: set[str] = set()  # the releases logged as not fitting the contract (once each)

    async def retention(self) -> Retention:
        kv = await self.state.resources.store.get(RETENTION_KEY)
        return Retention() if kv is None else Retention.model_validate_json(kv.value)

    async def set_retention(self, retention: Retention) -> Retention:
        await self.state.resources.store.put(RETENTION_KEY, retention.model_dump_json().encode())
        self._wake.set()  # the wait for the next pass follows the new interval
        return retention

    async def run(self) -> None:
        """Collect, then wait the retention's interval, for ever."""
        while True:
            try:
                await self.collect()
            except Exception:  # a failed pass (disk, store) is retried at the next one
                log.exception("collection failed")
            await self._wait()

    async def _wait(self) -> None:
        """Until `interval_s` after now, as the retention says at each change of it."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            self._wake.clear()
            try:
                interval = (await self.retention()).interval_s
            except Exception:
                interval = Retention().interval_s
            left = since + interval - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def collect(self) -> Collection:
        """One pass now, after any pass under way."""
        async with self._lock:
            started = time.time()
            retention = await self.retention()
            out = Collection(started_at=started)
            kept_deploys = await self._deploys(retention, started, out)
            keep_images, keep_locks, instance_ids, apps = await self._releases(retention, out)
            await asyncio.to_thread(
                self._logs, retention, started, kept_deploys, instance_ids, apps, keep_images, out
            )
            # A builder uploads a build's layers before its manifest: none are collected meanwhile.
            building = await self._building()
            swept = await asyncio.to_thread(
                self.state.images.collect,
                keep_images=keep_images,
                keep_locks=keep_locks,
                grace_s=retention.grace_s,
                busy=lambda: building,
            )
            out.manifests, out.layers, out.locks = swept.manifests, swept.layers, swept.locks
            out.archives = swept.archives
            out.bytes_freed += swept.bytes_freed
            out.images_deferred = swept.stopped
            if not swept.stopped:
                live_uids = await self._live_uids(retention, forget=True)
                # Left by builds in the API's process before builders were processes: nothing writes
                # them now, but a builder given this data dir would (see `osless builder --data-dir`).
                out.bytes_freed += await asyncio.to_thread(
                    collect_uid_folders,
                    (self.state.data_dir / "cache" / "uv", self.state.images.locks_dir),
                    live=live_uids,
                    grace_s=retention.grace_s,
                )
            # Builders collect their own stores after each pass (`GET /v1/builds/kept` watches this).
            await self.state.resources.store.put(COLLECTED_KEY, json.dumps({"at": started}).encode())
            out.seconds = round(time.time() - started, 3)
            if any((out.deploys, out.releases, out.logs, out.manifests, out.layers, out.locks, out.archives)):
                log.info("collected %s", out.model_dump_json())
            return out

    async def kept(self) -> Kept:
        """What the retention keeps now (deleting nothing): a builder collects its store by it."""
        kv = await self.state.resources.store.get(COLLECTED_KEY)
        retention = await self.retention()
        images, locks, _, _ = await self._releases(retention, None)
        uids = await self._live_uids(retention, forget=False)
        return Kept(
            collection=kv.mod_revision if kv is not None else 0,
            images=sorted(images),
            locks=sorted(locks),
            uids=sorted(map(int, uids)),
            grace_s=retention.grace_s,
        )

    async def _live_uids(self, retention: Retention, *, forget: bool) -> set[str]:
        """The uids of apps that exist. A uid given to a name whose first deploy failed (the build
        asks for it before there is an app) is let go once past the grace period: its claim in
        `/uids/` stays, so it is never handed out again, and its caches go with the next pass.
        `forget`: the name's claim in `/appuids/` is deleted then, too."""
        store = self.state.resources.store
        building = await self._building()
        items, _ = await store.list("/appuids/")
        apps = {kv.key.removeprefix("/apps/") for kv in (await store.list("/apps/"))[0]}
        live: set[str] = set()
        old = time.time() - retention.grace_s
        for kv in items:
            name, uid = kv.key.removeprefix("/appuids/"), str(json.loads(kv.value)["uid"])
            if name in apps or building:
                live.add(uid)
                continue
            claim = await store.get(f"/uids/{uid}")
            at = float(json.loads(claim.value).get("at", 0)) if claim is not None else 0.0
            if at >= old:
                live.add(uid)
                continue
            if forget:
                with contextlib.suppress(Conflict):  # taken meanwhile (a deploy of that name): kept
                    await store.delete(kv.key, if_revision=kv.mod_revision)
        return live

    async def _building(self) -> bool:
        """Whether a deploy is queued or building now."""
        deploys, _ = await self.state.resources.list_deploys()
        return any(d.status in ("queued", "building") for d in deploys)

    async def _deploys(self, retention: Retention, now: float, out: Collection) -> set[str]:
        """Delete the deploys past the retention (with their logs); the ids of those kept."""
        store = self.state.resources.store
        items, _ = await store.list("/deploys/")
        by_app: dict[str | None, list[tuple[Deploy, int]]] = defaultdict(list)
        for kv in items:
            d = Deploy.model_validate_json(kv.value)
            by_app[d.app].append((d, kv.mod_revision))
        kept: set[str] = set()
        oldest = now - retention.deploys_days * DAY_S
        for deploys in by_app.values():
            deploys.sort(key=lambda pair: pair[0].created_at, reverse=True)
            for rank, (d, rev) in enumerate(deploys):
                building = d.status in ("queued", "building")
                recent = (d.finished_at or d.created_at) >= oldest
                if not building:  # its source is no longer needed (left by a server that stopped)
                    self.state.source(d.id).unlink(missing_ok=True)
                if building or (recent and rank < retention.deploys_per_app):
                    kept.add(d.id)
                    continue
                with contextlib.suppress(Conflict):  # changed meanwhile: the next pass decides
                    if await store.delete(f"/deploys/{d.id}", if_revision=rev):
                        out.deploys += 1
                        await BuildLog(store, d.id, cap_bytes=1 << 20).delete()
                        self.state.source(d.id).unlink(missing_ok=True)
                        _unlink_log(self.state.deploy_log(d.id), out)
        if self.state.peers is not None:
            queued = {
                d.id for group in by_app.values() for d, _ in group if d.status in ("queued", "building")
            }
            await self.state.peers.forget_sources(queued)
        return kept

    async def _releases(
        self, retention: Retention, out: Collection | None
    ) -> tuple[set[str], set[str], set[str], set[str]]:
        """Delete the releases past the retention (none if `out` is None). Returns what the rest of
        the pass keeps: the images (of kept releases and of instances), the sha256 of their locks,
        instance ids, apps."""
        res = self.state.resources
        apps, _ = await res.list_apps()
        instances, _ = await res.list_instances()
        with_instances = {(i.app, i.release) for i in instances}
        keep_images = {i.image for i in instances} | {a.current_image for a in apps if a.current_image}
        keep_locks: set[str] = set()
        for app in apps:
            # One app at a time: a release carries its manifest, so all of them at once could be big.
            items, _ = await res.store.list(f"/releases/{app.name}/")
            parsed = []
            for kv in items:
                try:
                    parsed.append((Release.model_validate_json(kv.value), kv))
                except ValueError as e:
                    # One this code cannot read (a newer builder's, mid-upgrade) is kept whole, never
                    # fatal: a pass that stopped here would never free anything again.
                    self._keep_unreadable(kv.key, kv.value, e, keep_images, keep_locks)
            releases = sorted(parsed, key=lambda pair: pair[0].version, reverse=True)
            for rank, (release, kv) in enumerate(releases):
                keep = (
                    rank < retention.releases_per_app
                    or release.version == app.current_release
                    or (app.name, release.version) in with_instances
                )
                if not keep and out is not None:
                    with contextlib.suppress(Conflict):
                        if await res.store.delete(kv.key, if_revision=kv.mod_revision):
                            out.releases += 1
                            continue
                keep_images.add(release.image)
                if release.manifest.lock:
                    keep_locks.add(sha256_hex(release.manifest.lock.encode()))
        return keep_images, keep_locks, {i.id for i in instances}, {a.name for a in apps}

    def _keep_unreadable(
        self, key: str, value: bytes, error: ValueError, keep_images: set[str], keep_locks: set[str]
    ) -> None:
        """Keep what release `key` names, read loosely from its JSON, as the image store's sweep reads
        manifests; logged the first time."""
        if key not in self._unreadable:
            self._unreadable.add(key)
            log.warning("release %s does not fit the contract (%s): kept as it is", key, str(error)[:300])
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            raw = json.loads(value)
            image = raw.get("image")
            if isinstance(image, str) and image:
                keep_images.add(image)
            lock = raw.get("manifest", {}).get("lock")
            if isinstance(lock, str) and lock:
                keep_locks.add(sha256_hex(lock.encode()))

    def _logs(
        self,
        retention: Retention,
        now: float,
        kept_deploys: set[str],
        instance_ids: set[str],
        apps: set[str],
        images: set[str],
        out: Collection,
    ) -> None:
        """Delete build logs without a deploy, and the logs of instances, zygotes and egress proxies
        nothing runs any more once they are older than the retention."""
        for path in _files(self.state.deploy_logs_dir):
            if _log_id(path) not in kept_deploys and _mtime(path) < now - retention.grace_s:
                _unlink_log(path, out, rotated=False)
        prefixes = {image[:12] for image in images}
        oldest = now - retention.instance_logs_days * DAY_S
        apps_dir = self.state.logs_dir / "apps"
        for folder in _files(apps_dir):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in _files(folder):
                name = _log_id(path)
                live = (
                    name in instance_ids
                    or (name.startswith("zygote-") and name[len("zygote-") :] in prefixes)
                    or (name in ("egress", "volumes", "images") and folder.name in apps)
                )
                if not live and _mtime(path) < oldest:
                    _unlink_log(path, out, rotated=False)
            if folder.name not in apps:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only once empty


def _files(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _log_id(path: Path) -> str:
    """`i-1` for `i-1.log` and `i-1.log.1`, and its access lines' `i-1.log.access(.1)`."""
    name = path.name.removesuffix(".1").removesuffix(ACCESS_SUFFIX)
    return name.removesuffix(".log")


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _unlink_log(path: Path, out: Collection, rotated: bool = True) -> None:
    """Delete `path` (and its rotated `.1`), counted in `out`."""
    for p in (path, path.with_name(path.name + ".1")) if rotated else (path,):
        try:
            size = p.lstat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        out.logs += 1
        out.bytes_freed += size
