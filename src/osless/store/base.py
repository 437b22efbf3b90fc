"""The state store interface: keys, values, one global revision, watches and leases (etcd-like).

Only `api` and `server` import this package; everything else reaches the state through the API.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from osless.bounds import quoted

__all__ = [
    "DEFAULT_HISTORY",
    "MAX_VALUE_BYTES",
    "Compacted",
    "Conflict",
    "Event",
    "EventType",
    "KeyValue",
    "LeaseNotFound",
    "Store",
    "StoreError",
    "Unavailable",
    "ValueTooLarge",
]

EventType = Literal["PUT", "DELETE"]

# The largest value a backend takes (etcd's request limit is 1.5 MiB). Each record is sized well
# below it: a release carries its manifest, which a build keeps under 256 KiB.
MAX_VALUE_BYTES = 1024 * 1024

# Revisions of watch history a backend keeps (each revision has at least one event); a watch from
# before them raises `Compacted`.
DEFAULT_HISTORY = 10_000


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as stored. Revisions are values of the store's one global counter."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # 1 on creation, +1 on every put; a delete and re-create starts again at 1
    lease: int | None


@dataclass(frozen=True, slots=True)
class Event:
    """One change. Several events share a revision when they were written in one transaction."""

    type: EventType
    key: str
    kv: KeyValue | None  # None for DELETE
    revision: int


class StoreError(Exception):
    """Base of every error the store raises."""


class Conflict(StoreError):
    """A compare-and-swap failed: the key's mod_revision (0 = absent) was not the expected one."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        want = "to be absent" if expected == 0 else f"at mod_revision {expected}"
        have = "absent" if actual == 0 else f"at mod_revision {actual}"
        super().__init__(f"conflict on {key!r}: expected it {want}, but it is {have}")


class ValueTooLarge(StoreError):
    """A put's value passes MAX_VALUE_BYTES; nothing was written."""

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        super().__init__(
            f"the value for {quoted(key)} would be {size} bytes, "
            f"past the store's limit of {MAX_VALUE_BYTES} bytes"
        )


class Compacted(StoreError):
    """A watch asked for events older than the retained history; list again and watch from there."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        self.requested = requested
        self.compact_revision = compact_revision
        super().__init__(
            f"revision {requested} is compacted: history starts after revision {compact_revision}; "
            "list again and watch from the revision it returns"
        )


class LeaseNotFound(StoreError):
    """The lease is unknown, revoked or expired."""

    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id} not found (unknown, revoked or expired)")


class Unavailable(StoreError):
    """The backend did not answer in time. A write it was sending may or may not have been applied."""


class Store(Protocol):
    """What `api` needs from a state backend (SQLite on one machine, etcd for a fleet).

    Keys start with `/`; a prefix is '' (every key) or starts with `/`. Every successful write
    bumps the one global revision: numbers are only ever compared, as a shared etcd's writes by
    others bump it too. `if_revision`: None = unconditional, 0 = the key must not exist, N = the
    key's mod_revision must be N; otherwise `Conflict`. A value past MAX_VALUE_BYTES is refused
    with `ValueTooLarge` before anything is written.
    """

    # `builtins.list` in signatures: inside this class body, plain `list` is the method below.

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        """Items under `prefix` sorted by key, and the revision they are current at."""
        ...

    async def put(
        self, key: str, value: bytes, *, if_revision: int | None = None, lease: int | None = None
    ) -> KeyValue: ...

    async def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        """False if the key is absent (whatever `if_revision`); `Conflict` if it exists at another one."""
        ...

    async def txn_put_many(self, puts: builtins.list[tuple[str, bytes, int | None]]) -> int:
        """(key, value, if_revision) puts applied atomically under one revision, which is returned.

        If any check fails, `Conflict` and nothing is written.
        """
        ...

    async def txn(
        self,
        *,
        puts: builtins.list[tuple[str, bytes, int | None]] | None = None,
        deletes: builtins.list[tuple[str, int | None]] | None = None,
        delete_prefixes: builtins.list[str] | None = None,
        checks: builtins.list[tuple[str, int]] | None = None,
    ) -> int:
        """Puts and deletes applied atomically under one revision, which is returned (as etcd's Txn).

        Every key under `delete_prefixes` and each of `deletes` (key, if_revision) is deleted, then
        the `puts` are written; a key appears at most once in `puts`, `deletes` and `checks`, no put
        falls under a deleted prefix (`ValueError`, as etcd refuses both), and a delete of an absent
        key with no check deletes nothing. `checks` (key, mod_revision; 0 for absent) are keys read
        but not written, which must not have changed (a write that holds only while another record
        stands). If any check fails, `Conflict` and nothing changes. With nothing to change, the
        revision is not bumped.
        """
        ...

    def watch(self, prefix: str, *, after_revision: int) -> AsyncIterator[Event]:
        """Every event under `prefix` with revision > `after_revision`: history first, then live.

        Runs until the consumer stops iterating (use `contextlib.aclosing` for prompt cleanup).
        `Compacted` (on first iteration) if that history is gone.
        """
        ...

    async def revision(self) -> int: ...

    async def grant_lease(self, ttl_s: float) -> int:
        """A lease that lives `ttl_s` past its last keepalive, or a little longer: etcd counts whole
        seconds, at least its minimum (1.5 election timeouts), and expires leases every 0.5 s."""
        ...

    async def keepalive(self, lease_id: int) -> None: ...

    async def revoke(self, lease_id: int) -> None: ...
