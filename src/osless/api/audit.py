"""The audit log: every write that reached a route, who made it, from where, and how it ended.

Entries live in the store under `/audit/{ns since the epoch, 20 digits}-{random}`, so the keys sort by
time. Each is small and capped; `prune` keeps the newest `MAX_ENTRIES` within `MAX_AGE_S`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from pydantic import BaseModel

from osless.store import Store

__all__ = ["MAX_AGE_S", "MAX_ENTRIES", "AuditEntry", "prune", "query", "record"]

PREFIX = "/audit/"
MAX_ENTRIES = 10_000
MAX_AGE_S = 30 * 86400
PATH_CAP = 256
FIELD_CAP = 64


class AuditEntry(BaseModel):
    id: str
    at: float
    token: str  # the token's id, or "app:NAME"
    name: str
    role: str
    method: str
    path: str  # with the query string; capped
    status: int
    app: str | None
    client: str | None


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def record(
    store: Store,
    *,
    token: str,
    name: str,
    role: str,
    method: str,
    path: str,
    status: int,
    app: str | None,
    client: str | None,
) -> AuditEntry:
    ns = time.time_ns()
    key_id = f"{ns:020d}-{secrets.token_hex(4)}"
    entry = AuditEntry(
        id=key_id,
        at=ns / 1e9,
        token=_cap(token, FIELD_CAP),
        name=_cap(name, FIELD_CAP),
        role=_cap(role, FIELD_CAP),
        method=_cap(method, 16),
        path=_cap(path, PATH_CAP),
        status=status,
        app=None if app is None else _cap(app, FIELD_CAP),
        client=None if client is None else _cap(client, FIELD_CAP),
    )
    await store.put(PREFIX + key_id, entry.model_dump_json().encode())
    return entry


async def query(
    store: Store, *, app: str | None = None, since: float | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest `limit` entries (newest first), of `app` only and after `since` if given."""
    items, _ = await store.list(PREFIX)
    out: list[dict[str, Any]] = []
    for kv in reversed(items):
        entry = json.loads(kv.value)
        if since is not None and entry["at"] < since:
            break  # keys sort by time: everything further is older
        if app is not None and entry.get("app") != app:
            continue
        out.append(entry)
        if len(out) >= limit:
            break
    return out


async def prune(store: Store, *, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S) -> int:
    """Delete all but the newest `max_entries` entries younger than `max_age_s`; returns how many went."""
    items, _ = await store.list(PREFIX)
    cutoff = f"{PREFIX}{time.time_ns() - int(max_age_s * 1e9):020d}"
    keep_from = max(0, len(items) - max_entries)
    old = [kv.key for i, kv in enumerate(items) if i < keep_from or kv.key < cutoff]
    for start in range(0, len(old), 256):  # concurrent deletes share the store's fsyncs
        await asyncio.gather(*(store.delete(k) for k in old[start : start + 256]))
    return len(old)
