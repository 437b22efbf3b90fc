"""A deploy's build log, in the store: any server reads it, and it outlives the process that wrote it.

Under `/buildlogs/{deploy}/`: chunks `{seq:08d}` (a JSON list of records, as `logs.LogWriter` writes
them: `ts`, `source`, `stream`, `line`) and `meta` (`seq`, `bytes`, `capped`, `closed`), written
together in one transaction, so two writers never take one seq and the cap holds across servers.
The log stops at its cap, its last line saying so (as a build's log file did); `closed` is set with
the last line the API writes (released, or failed), and a follower stops there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

from osless.api.errors import ApiError
from osless.bounds import MAX_LINE_CHARS, cap
from osless.store import Conflict, Event, Store

__all__ = ["LOG_PREFIX", "BuildLog"]

LOG_PREFIX = "/buildlogs/"
DEPLOYS_PREFIX = "/deploys/"  # `/deploys/{id}`, as `api.resources` writes them
CHUNK_BYTES = 128 * 1024  # well below a store value's 1 MiB, escapes and all
_NOTICE_ROOM = 512
_ATTEMPTS = 50


class BuildLog:
    """The build log of one deploy, appended and read through the store."""

    def __init__(self, store: Store, deploy_id: str, *, cap_bytes: int) -> None:
        self.store = store
        self.deploy_id = deploy_id
        self.cap_bytes = cap_bytes
        self.prefix = f"{LOG_PREFIX}{deploy_id}/"

    def _record(self, line: str, stream: str) -> dict[str, Any]:
        return {"ts": round(time.time(), 6), "source": self.deploy_id, "stream": stream, "line": line}

    async def append(self, lines: list[str], stream: str = "build", *, close: bool = False) -> bool:
        """Add `lines` (each cut to a log line's cap); `close`: the last lines. False if the log was
        already closed, or its deploy is gone (nothing added)."""
        records = [self._record(cap(line.rstrip("\n"), MAX_LINE_CHARS), stream) for line in lines]
        for _ in range(_ATTEMPTS):
            kv = await self.store.get(self.prefix + "meta")
            meta = json.loads(kv.value) if kv is not None else {"seq": 0, "bytes": 0}
            checks: list[tuple[str, int]] = []
            if kv is None:
                # A log is begun only while its deploy stands: the last line of a build ended just
                # before its app's delete (which took the log) would otherwise outlive both.
                deploy = await self.store.get(f"{DEPLOYS_PREFIX}{self.deploy_id}")
                if deploy is None:
                    return False
                checks.append((deploy.key, deploy.mod_revision))
            if meta.get("closed"):
                return False
            size, kept = int(meta["bytes"]), []
            if not meta.get("capped"):
                for rec in records:
                    n = len(json.dumps(rec, ensure_ascii=False).encode()) + 1
                    if size + n > self.cap_bytes - _NOTICE_ROOM:
                        notice = (
                            f"log cut: it reached its cap of {self.cap_bytes} bytes; later lines were dropped"
                        )
                        kept.append(self._record(notice, "osless"))
                        meta["capped"] = True
                        break
                    kept.append(rec)
                    size += n
            puts: list[tuple[str, bytes, int | None]] = []
            seq = int(meta["seq"])
            for chunk in _chunks(kept):
                seq += 1
                puts.append((f"{self.prefix}{seq:08d}", chunk, 0))
            meta.update(seq=seq, bytes=size, closed=bool(close or meta.get("closed")))
            if not puts and not close:
                return True
            puts.append((self.prefix + "meta", json.dumps(meta).encode(), kv.mod_revision if kv else 0))
            try:
                await self.store.txn(puts=puts, checks=checks)
                return True
            except Conflict:
                continue  # another writer appended meanwhile (or the deploy changed): read again
        raise ApiError(409, "conflict", f"the build log of {self.deploy_id} is changing too often; try again")

    async def read(self) -> tuple[list[dict[str, Any]], bool, int]:
        """(every record, whether the log is closed, the revision read at)."""
        items, rev = await self.store.list(self.prefix)
        records: list[dict[str, Any]] = []
        closed = False
        for kv in items:
            if kv.key.endswith("/meta"):
                closed = bool(json.loads(kv.value).get("closed"))
            else:
                records.extend(json.loads(kv.value))
        return records, closed, rev

    async def follow(
        self, ended: Callable[[], Awaitable[bool]], *, grace_s: float = 5.0
    ) -> AsyncIterator[dict[str, Any]]:
        """Every record, then each as it is written, until the log is closed (or, for a deploy that
        `ended()` without its log closed, as a server stopping between the two leaves it, `grace_s`
        after that was seen)."""
        records, closed, rev = await self.read()
        for rec in records:
            yield rec
        if closed:
            return
        seen = len(records)
        events: asyncio.Queue[Event] = asyncio.Queue(maxsize=64)

        async def pump() -> None:
            watch = cast(AsyncGenerator[Event, None], self.store.watch(self.prefix, after_revision=rev))
            async with contextlib.aclosing(watch):
                async for ev in watch:
                    await events.put(ev)  # bounded: a slow reader holds the watch back

        pumping = asyncio.create_task(pump())
        ended_at: float | None = None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if pumping.done():
                        pumping.result()  # the watch failed: say so
                        return
                    if not await ended():
                        ended_at = None
                        continue
                    at = time.monotonic()
                    ended_at = ended_at or at
                    if at - ended_at >= grace_s:
                        return
                    continue
                if ev.kv is None:
                    continue
                if ev.key.endswith("/meta"):
                    if json.loads(ev.kv.value).get("closed"):
                        # Read whole once more: the last chunks are not taken on trust to come first.
                        for rec in (await self.read())[0][seen:]:
                            yield rec
                        return
                    continue
                for rec in json.loads(ev.kv.value):
                    seen += 1
                    yield rec
        finally:
            pumping.cancel()
            with contextlib.suppress(BaseException):
                await pumping

    async def delete(self) -> None:
        await self.store.txn(delete_prefixes=[self.prefix])


def _chunks(records: list[dict[str, Any]]) -> list[bytes]:
    out: list[bytes] = []
    batch: list[str] = []
    size = 0
    for rec in records:
        text = json.dumps(rec, ensure_ascii=False)
        if batch and size + len(text) > CHUNK_BYTES:
            out.append(("[" + ",".join(batch) + "]").encode())
            batch, size = [], 0
        batch.append(text)
        size += len(text) + 1
    if batch:
        out.append(("[" + ",".join(batch) + "]").encode())
    return out
