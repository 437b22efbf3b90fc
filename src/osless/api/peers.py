"""Servers sharing one store serve each other what they lack: image manifests, layer archives and
deploy sources, fetched from a live peer on a miss, checked, stored, then served.

Each server holds `/servers/{id}` on a lease of its own (its API's URL, as peers reach it): the
store is written only by servers (nodes, gateways and builders reach it through the API alone), so
nothing a node or an app controls chooses where a server fetches from. A server shows a peer token
(`SecretBox.peer_token`, derived from the key servers share), never its caller's. What comes back is
checked before it is kept: a manifest's sha256 is its digest, an archive's its name, a source's the
one recorded at upload. On a miss (a node pulls a release through a server that lacks it), and in
the background after each release (`api.replicate`: every server copies each current image, so one
survives the server it was built on).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from osless.api.secrets import SecretBox
from osless.contracts import ImageManifest, manifest_problem
from osless.images import (
    MAX_MANIFEST_BYTES,
    ImageStore,
    canonical_json,
    fsync_dir,
    manifest_json,
    write_file,
)
from osless.store import Conflict, Store

__all__ = ["SERVERS", "SOURCES", "Fetched", "Peers", "ServerLease"]

log = logging.getLogger("osless.api.peers")

SERVERS = "/servers/"
SOURCES = "/sources/"  # deploy id -> {"server": the id of the one it was uploaded to, "sha256"}
SERVER_TTL_S = 10.0
RENEW_S = 2.0
PEER_TOKEN_TTL_S = 60.0
SOURCE_GRACE_S = 60.0  # a source's record is written just before its deploy is queued
CONNECT_S = 3.0
READ_S = 60.0  # between two chunks: a stalled peer gives way to the next

# What a fetch came to: kept here; absent (every live peer answered that it has none, or none is
# live: asking again cannot help); failed (a peer did not answer whole: worth asking again).
Fetched = Literal["kept", "absent", "failed"]


@dataclass
class Peers:
    """This server's way to the others: who is live, and the fetches of what it lacks (one at a
    time per object: concurrent misses wait on the same fetch)."""

    store: Store
    secrets: SecretBox
    http: httpx.AsyncClient
    server_id: str
    images: ImageStore
    max_layer_bytes: int
    max_source_bytes: int
    _flights: dict[str, asyncio.Task[Fetched]] = field(default_factory=dict)

    async def live(self, first: str | None = None) -> list[tuple[str, str]]:
        """(id, URL) of each live peer, `first` (a holder on record) first."""
        items, _ = await self.store.list(SERVERS)
        found: list[tuple[str, str]] = []
        for kv in items:
            server = kv.key.removeprefix(SERVERS)
            if server == self.server_id:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                url = str(json.loads(kv.value)["url"])
                if url.startswith(("http://", "https://")):
                    found.append((server, url.rstrip("/")))
        found.sort(key=lambda p: p[0] != first)
        return found

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secrets.peer_token(self.server_id, PEER_TOKEN_TTL_S)}"}

    async def _once(self, key: str, fetch: Callable[[], Coroutine[Any, Any, Fetched]]) -> Fetched:
        task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(fetch(), name=f"peer fetch {key}")
            self._flights[key] = task
            task.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(task)

    async def manifest(self, digest: str) -> bool:
        """Whether image `digest` is here now, fetched from a peer if it was not."""
        return await self.fetch_manifest(digest) == "kept"

    async def fetch_manifest(self, digest: str) -> Fetched:
        if self.images.has_manifest(digest):
            return "kept"
        return await self._once(f"image {digest}", lambda: self._fetch_manifest(digest))

    async def _fetch_manifest(self, digest: str) -> Fetched:
        outcome: Fetched = "absent"
        for server, url in await self.live():
            try:
                data = await self._read(f"{url}/v1/images/{digest}", MAX_MANIFEST_BYTES)
            except _Absent:
                continue
            except (httpx.HTTPError, _Refused) as e:
                log.info("image %s not fetched from server %s: %s", digest[:12], server, e)
                outcome = "failed"
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                log.warning("server %s sent image %s with other bytes: refused", server, digest[:12])
                outcome = "failed"
                continue
            try:  # the contract, and canonical JSON: what an upload is held to
                manifest = ImageManifest.model_validate_json(data)
                if manifest_json(manifest) != data:
                    raise ValueError("not canonical JSON")
            except ValueError as e:
                why = manifest_problem(e) if isinstance(e, ValidationError) else str(e)
                log.warning("server %s sent image %s, not a manifest (%s): refused", server, digest[:12], why)
                outcome = "failed"
                continue
            await asyncio.to_thread(self._keep_manifest, manifest)
            return "kept"
        return outcome

    def _keep_manifest(self, manifest: ImageManifest) -> None:
        images = self.images
        # What the collector reads to keep an image's archives, as an upload writes it.
        for layer, archive in manifest.archived_layers().items():
            record = canonical_json(archive.model_dump())
            write_file(images.archived_dir / f"{layer}.json", record, images.tmp_dir)
        images.put_manifest(manifest)

    async def archive(self, sha256: str) -> bool:
        """Whether layer archive `sha256` is here now, fetched from a peer if it was not."""
        return await self.fetch_archive(sha256) == "kept"

    async def fetch_archive(self, sha256: str) -> Fetched:
        if await asyncio.to_thread(self.images.touch_archive, sha256):  # the grace protects it now
            return "kept"
        return await self._once(f"layer {sha256}", lambda: self._fetch_archive(sha256))

    async def _fetch_archive(self, sha256: str) -> Fetched:
        outcome: Fetched = "absent"
        for server, url in await self.live():
            dest = self.images.archive_path(sha256)
            got = await self._download(
                server, f"{url}/v1/layers/{sha256}", sha256, dest, self.max_layer_bytes
            )
            if got == "kept":
                fsync_dir(dest.parent)
                return got
            if got == "failed":
                outcome = got
        return outcome

    async def source(self, deploy_id: str, dest: Path) -> bool:
        """Whether deploy `deploy_id`'s source is at `dest` now, fetched from its holder (or any peer)
        if it was not, and checked against the sha256 recorded at its upload."""
        return await self.fetch_source(deploy_id, dest) == "kept"

    async def fetch_source(self, deploy_id: str, dest: Path) -> Fetched:
        if dest.is_file():
            return "kept"
        return await self._once(f"source {deploy_id}", lambda: self._fetch_source(deploy_id, dest))

    async def _fetch_source(self, deploy_id: str, dest: Path) -> Fetched:
        kv = await self.store.get(SOURCES + deploy_id)
        if kv is None:
            return "absent"
        record = json.loads(kv.value)
        outcome: Fetched = "absent"
        for server, url in await self.live(first=str(record.get("server"))):
            got = await self._download(
                server, f"{url}/v1/sources/{deploy_id}", str(record["sha256"]), dest, self.max_source_bytes
            )
            if got == "kept":
                return got
            if got == "failed":
                outcome = got
        return outcome

    async def record_source(self, deploy_id: str, sha256: str) -> None:
        """Deploy `deploy_id`'s source is on this server, with that sha256 (before it is queued)."""
        value = json.dumps({"server": self.server_id, "sha256": sha256, "at": time.time()}).encode()
        await self.store.put(SOURCES + deploy_id, value)

    async def drop_source(self, deploy_id: str) -> None:
        await self.store.delete(SOURCES + deploy_id)

    async def forget_sources(self, building: set[str]) -> int:
        """Drop the records of sources whose deploy no longer builds (deleted with its app, or ended
        by a server that stopped before it dropped the record); not those just written, whose
        deploy may be about to be queued. How many went."""
        items, _ = await self.store.list(SOURCES)
        gone = 0
        for kv in items:
            deploy = kv.key.removeprefix(SOURCES)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if (
                    deploy in building
                    or time.time() - float(json.loads(kv.value).get("at", 0)) < SOURCE_GRACE_S
                ):
                    continue
            with contextlib.suppress(Conflict):
                gone += await self.store.delete(kv.key, if_revision=kv.mod_revision)
        return gone

    async def reachable_sources(self) -> set[str]:
        """The deploys whose source a live peer holds (the one it was uploaded to)."""
        live = {server for server, _ in await self.live()}
        items, _ = await self.store.list(SOURCES)
        found: set[str] = set()
        for kv in items:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(kv.value)["server"] in live:
                    found.add(kv.key.removeprefix(SOURCES))
        return found

    async def _read(self, url: str, limit: int) -> bytes:
        timeout = httpx.Timeout(READ_S, connect=CONNECT_S)
        async with self.http.stream("GET", url, headers=self._headers(), timeout=timeout) as r:
            if r.status_code == 404:
                raise _Absent()
            if r.status_code != 200:
                raise _Refused(f"{r.status_code}")
            data = b""
            async for chunk in r.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise _Refused(f"past {limit} bytes")
            return data

    async def _download(self, server: str, url: str, sha256: str, dest: Path, limit: int) -> Fetched:
        """`url`'s body at `dest` if its sha256 is `sha256` (else nothing is kept), at most `limit` bytes."""
        fd, tmp = tempfile.mkstemp(prefix=f"peer-{sha256[:12]}-", dir=self.images.tmp_dir)
        digest = hashlib.sha256()
        size = 0
        timeout = httpx.Timeout(READ_S, connect=CONNECT_S)
        try:
            with os.fdopen(fd, "wb") as f:
                async with self.http.stream("GET", url, headers=self._headers(), timeout=timeout) as r:
                    if r.status_code == 404:
                        return "absent"
                    if r.status_code != 200:
                        log.info("%s not fetched from server %s: %s", url, server, r.status_code)
                        return "failed"
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            log.warning("server %s sent past %d bytes for %s: refused", server, limit, url)
                            return "failed"
                        digest.update(chunk)
                        await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(_sync, f)
            if digest.hexdigest() != sha256:
                log.warning(
                    "server %s sent %s with sha256 %s, not %s: refused",
                    server,
                    url,
                    digest.hexdigest(),
                    sha256,
                )
                return "failed"
            os.chmod(tmp, 0o400)
            os.replace(tmp, dest)
            return "kept"
        except httpx.HTTPError as e:
            log.info("%s not fetched from server %s: %r", url, server, e)
            return "failed"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _Refused(Exception):
    """A peer's answer that is not the object asked for."""


class _Absent(Exception):
    """A peer's answer that it has no such object (404)."""


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


@dataclass
class ServerLease:
    """This server's `/servers/{id}` record, on a lease it keeps alive: gone ~10 s after it stops."""

    store: Store
    server_id: str
    url: str

    async def run(self) -> None:
        value = json.dumps({"url": self.url}).encode()
        while True:
            try:
                lease = await self.store.grant_lease(SERVER_TTL_S)
                await self.store.put(SERVERS + self.server_id, value, lease=lease)
                while True:
                    await asyncio.sleep(RENEW_S)
                    await self.store.keepalive(lease)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store away, or the lease lapsed: registered anew
                log.warning("this server's record in the store lapsed (%r): registering anew", e)
                await asyncio.sleep(RENEW_S)

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self.store.delete(SERVERS + self.server_id)
