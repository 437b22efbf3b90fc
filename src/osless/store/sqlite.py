"""SQLite backend of the store.

Writes, lists and history reads run on one dedicated thread (one connection, created there): the
event loop never waits on an fsync, and writes are serialised without any locking of our own. A
point read (`get`, `revision`) is one indexed lookup in pages the OS has cached, cheaper than a trip
to that thread and back, so it runs on the loop over a second, read-only connection; in WAL mode
it never waits for the writer. Watchers are woken
in-process after a commit. The events of recent commits are also kept in memory, handed over by the
store thread as it commits, so a watcher that keeps up never queues a read behind other work on
that thread; one that fell behind (or starts from an older revision) reads the `events` table.

Durability is pipelined. A commit only writes the WAL (synchronous=NORMAL), so it is visible at once
and already survives the process being killed; a second thread then fsyncs the WAL, and a write is
acknowledged to its caller only after that (group commit: one fsync covers every commit before it).
Watchers on this machine may therefore act on a change a few milliseconds before it is on disk;
only a power loss in that window could lose it, and that takes them down with it. An unacknowledged
write was never promised, so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import functools
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from osless.store.base import (
    DEFAULT_HISTORY,
    Compacted,
    Conflict,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Store,
    StoreError,
)
from osless.store.checks import check_if_revision, check_key, check_prefix, check_txn, check_value

__all__ = ["DEFAULT_HISTORY", "SQLiteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

RECENT_EVENTS = 4096  # kept in memory for watchers, at most (never more than the history)
_WATCH_BATCH = 500  # events read per query, so a far-behind watcher does not load all history at once
_SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
        mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL",
    # kv fields are copied into PUT events so a watcher gets the KeyValue as it was at that revision.
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, rev INTEGER NOT NULL, key TEXT NOT NULL,
        type TEXT NOT NULL, value BLOB, create_rev INTEGER, version INTEGER, lease INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS events_rev ON events (rev)",
    # AUTOINCREMENT: a revoked lease's id is never handed out again, so a stale holder cannot
    # keep someone else's lease alive.
    """CREATE TABLE IF NOT EXISTS leases (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compact_revision', 0)",
)

_KV_COLUMNS = "key, value, create_rev, mod_rev, version, lease"
_EVENT_COLUMNS = "id, rev, key, type, value, create_rev, version, lease"


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so `key >= prefix AND
    key < end` is an index range scan that matches exactly the keys with that prefix.
    """
    chars = builtins.list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000  # surrogates cannot be encoded to UTF-8
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def _prefix_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = _prefix_end(prefix)
    if not prefix:
        return "1", ()
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


class SQLiteStore(Store):
    """The store in one SQLite file (WAL, fsynced before a write is acknowledged; see above).

    Call `start()` (or use `async with`) before anything else; one process should own the file.
    """

    def __init__(
        self, path: str | Path, *, history: int = DEFAULT_HISTORY, sweep_interval: float = 0.25
    ) -> None:
        if history < 1:
            raise ValueError("history must keep at least one revision")
        self.path = Path(path)
        self._history = history
        self._sweep_interval = sweep_interval
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the executor's thread
        self._reader: sqlite3.Connection | None = None  # touched only on the loop's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        # Replaced (after being set) on every commit: a watcher takes the current one *before*
        # reading, so a commit that lands after its read still wakes it.
        self._changed = asyncio.Event()
        self._watchers = 0  # live watch generators; lets tests see that a stopped watch cleaned up
        self._syncer: ThreadPoolExecutor | None = None
        self._committed = 0  # commits so far (counted on the store thread)
        self._durable = 0  # of those, how many an fsync has covered
        self._flush_lock = asyncio.Lock()
        self._pending: builtins.list[Event] = []  # the open transaction's events (store thread)
        # The newest events in revision order, appended on the loop in commit order.
        self._recent: collections.deque[Event] = collections.deque(maxlen=min(RECENT_EVENTS, history))

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise StoreError("store is closed; open a new one")
        if self._executor is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="osless-store")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="osless-store-fsync")
        try:
            await self._run(self._open_sync)
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            self._reader = sqlite3.connect(uri, uri=True, isolation_level=None)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            self._syncer.shutdown(wait=False)
            self._syncer = None
            raise
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="osless-store-lease-sweeper")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # from here on new operations fail fast
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])  # unlike `await task`, does not re-raise its cancel
            self._sweeper = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        executor = self._executor
        if executor is not None:
            # Queued after any work already submitted, so in-flight operations finish first.
            await asyncio.wrap_future(executor.submit(self._close_sync))
            executor.shutdown(wait=True)  # the thread is idle by now: this does not block
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)  # an fsync under way finishes; closing synced the rest
            self._syncer = None
        self._wake()  # waiting watchers see `_closed` and stop

    async def __aenter__(self) -> SQLiteStore:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreError("store is closed")
        if self._executor is None:
            raise StoreError("store is not started: call start() first")
        return await asyncio.wrap_future(self._executor.submit(fn))

    async def _acknowledge(self, result: T) -> T:
        """Return `result` once every commit so far is on disk (sharing an fsync with concurrent
        writers), so an acknowledged write survives a power loss, not only a crash."""
        wanted = self._committed
        async with self._flush_lock:
            if self._durable >= wanted:
                return result  # another writer's fsync covered this commit
            if self._syncer is None:
                return result  # closed since: closing checkpointed the WAL, with an fsync
            covered = self._committed  # read before the fsync: all of these are in the WAL already
            await asyncio.wrap_future(self._syncer.submit(self._fsync_sync))
            self._durable = max(self._durable, covered)
        return result

    def _fsync_sync(self) -> None:
        # The WAL holds every commit not yet checkpointed; a checkpoint (under NORMAL) fsyncs the
        # WAL before and the database after, so syncing both covers wherever a commit now lives.
        for path in (Path(f"{self.path}-wal"), self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _publish(self, events: builtins.list[Event]) -> None:
        self._recent.extend(events)
        self._wake()

    def _from_recent(self, prefix: str, cursor: int) -> tuple[builtins.list[Event], int] | None:
        """The events after `cursor` from memory, and the revision read up to; None when memory
        does not reach back that far (the table has them)."""
        recent = self._recent
        if not recent or recent[0].revision > cursor + 1:
            return None
        newer: builtins.list[Event] = []
        for event in reversed(recent):  # a watcher that keeps up wants only the last few
            if event.revision <= cursor:
                break
            newer.append(event)
        newer.reverse()
        head = newer[-1].revision if newer else cursor
        return [e for e in newer if e.key.startswith(prefix)], head

    def _notify(self, events: builtins.list[Event]) -> None:
        """Hand a commit's events to the loop and wake watchers. Called on the store thread, so
        even a write whose caller was cancelled while it ran still wakes them."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to wake
            loop.call_soon_threadsafe(self._publish, events)

    # -- async API --------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        return self._get_sync(self._read(), key)

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        check_prefix(prefix)
        return await self._run(lambda: self._list_sync(prefix))

    async def put(
        self, key: str, value: bytes, *, if_revision: int | None = None, lease: int | None = None
    ) -> KeyValue:
        check_key(key)
        check_if_revision(if_revision)
        data = bytes(value)
        check_value(key, data)
        return await self._acknowledge(await self._run(lambda: self._put_sync(key, data, if_revision, lease)))

    async def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        check_key(key)
        check_if_revision(if_revision)
        return await self._acknowledge(await self._run(lambda: self._delete_sync(key, if_revision)))

    async def txn_put_many(self, puts: builtins.list[tuple[str, bytes, int | None]]) -> int:
        return await self.txn(puts=puts)

    async def txn(
        self,
        *,
        puts: builtins.list[tuple[str, bytes, int | None]] | None = None,
        deletes: builtins.list[tuple[str, int | None]] | None = None,
        delete_prefixes: builtins.list[str] | None = None,
        checks: builtins.list[tuple[str, int]] | None = None,
    ) -> int:
        items, gone, prefixes, unchanged = check_txn(puts, deletes, delete_prefixes, checks)
        return await self._acknowledge(
            await self._run(lambda: self._txn_sync(items, gone, prefixes, unchanged))
        )

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncGenerator[Event, None]:
        check_prefix(prefix)
        if after_revision < 0:
            raise ValueError(f"after_revision must be >= 0, not {after_revision}")
        cursor = after_revision
        self._watchers += 1
        try:
            while True:
                changed = self._changed  # before the read; see __init__
                recent = self._from_recent(prefix, cursor)
                if recent is not None:
                    batch, cursor = recent
                else:
                    # partial, not a lambda: binds the cursor's value now
                    batch = await self._run(functools.partial(self._events_sync, prefix, cursor))
                    if batch:
                        # Batches end on a revision boundary, so the cursor can be a revision.
                        cursor = batch[-1].revision
                if batch:
                    for event in batch:
                        yield event
                    continue
                if self._closed:
                    raise StoreError("store is closed")
                await changed.wait()
        finally:
            self._watchers -= 1

    async def revision(self) -> int:
        return self._meta(self._read(), "revision")

    async def grant_lease(self, ttl_s: float) -> int:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl must be positive, not {ttl_s}")
        return await self._acknowledge(await self._run(lambda: self._grant_sync(float(ttl_s))))

    async def keepalive(self, lease_id: int) -> None:
        # Not waited onto disk: a keepalive lost with the power had holders that went with it.
        await self._run(lambda: self._keepalive_sync(lease_id))

    async def revoke(self, lease_id: int) -> None:
        await self._run(lambda: self._revoke_sync(lease_id))
        await self._acknowledge(None)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self._run(self._expire_sync)
            except StoreError:
                return  # closed under us
            except Exception:
                # Keep sweeping: a transient error (disk full, busy) must not end lease expiry.
                log.exception("lease sweep failed")
            await asyncio.sleep(self._sweep_interval)

    # -- on the store thread ----------------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("store is closed")
        if self._reader is None:
            raise StoreError("store is not started: call start() first")
        return self._reader

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # what the code says.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")
            # NORMAL: a commit writes the WAL without an fsync; `_acknowledge` syncs it off this
            # thread before any write is acknowledged (see the module's docstring).
            conn.execute("PRAGMA synchronous = NORMAL")
            with self._txn(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {version} is newer than this osless")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _txn(self, conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
        # IMMEDIATE for writes: take the write lock up front rather than fail to upgrade midway.
        conn.execute(f"BEGIN {mode}")
        try:
            yield
            conn.execute("COMMIT")
            self._committed += 1
        except BaseException:
            self._pending = []
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if self._pending:
            events, self._pending = self._pending, []
            self._notify(events)

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        value: int = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]
        return value

    @staticmethod
    def _kv(row: tuple[str, bytes, int, int, int, int | None]) -> KeyValue:
        return KeyValue(row[0], row[1], row[2], row[3], row[4], row[5])

    def _get_sync(self, conn: sqlite3.Connection, key: str) -> KeyValue | None:
        row = conn.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._kv(row)

    def _list_sync(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        conn = self._db()
        where, args = _prefix_clause(prefix)
        with self._txn(conn, "DEFERRED"):  # one snapshot for the items and the revision
            rows = conn.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE {where} ORDER BY key", args)
            items = [self._kv(row) for row in rows]
            rev = self._meta(conn, "revision")
        return items, rev

    def _check(self, key: str, current: KeyValue | None, if_revision: int | None) -> None:
        actual = 0 if current is None else current.mod_revision
        if if_revision is not None and if_revision != actual:
            raise Conflict(key, if_revision, actual)

    def _bump(self, conn: sqlite3.Connection) -> int:
        """Take the next revision, and drop history that fell out of the window."""
        rev = self._meta(conn, "revision") + 1
        conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        compact = rev - self._history
        if compact > self._meta(conn, "compact_revision"):
            conn.execute("DELETE FROM events WHERE rev <= ?", (compact,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (compact,))
        return rev

    def _write_kv(
        self,
        conn: sqlite3.Connection,
        key: str,
        value: bytes,
        current: KeyValue | None,
        rev: int,
        lease: int | None,
    ) -> KeyValue:
        kv = KeyValue(
            key=key,
            value=value,
            create_revision=rev if current is None else current.create_revision,
            mod_revision=rev,
            version=1 if current is None else current.version + 1,
            lease=lease,  # a put without a lease detaches the key from its old one, as in etcd
        )
        conn.execute(
            f"INSERT OR REPLACE INTO kv ({_KV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        )
        self._append_event(conn, rev, "PUT", key, kv)
        return kv

    def _delete_kv(self, conn: sqlite3.Connection, key: str, rev: int) -> None:
        conn.execute("DELETE FROM kv WHERE key = ?", (key,))
        self._append_event(conn, rev, "DELETE", key, None)

    def _append_event(
        self, conn: sqlite3.Connection, rev: int, type_: EventType, key: str, kv: KeyValue | None
    ) -> None:
        self._pending.append(Event(type_, key, kv, rev))
        conn.execute(
            "INSERT INTO events (rev, key, type, value, create_rev, version, lease)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rev,
                key,
                type_,
                None if kv is None else kv.value,
                None if kv is None else kv.create_revision,
                None if kv is None else kv.version,
                None if kv is None else kv.lease,
            ),
        )

    @staticmethod
    def _check_lease(conn: sqlite3.Connection, lease_id: int, now: float) -> None:
        row = conn.execute("SELECT expires_at FROM leases WHERE id = ?", (lease_id,)).fetchone()
        if row is None or row[0] <= now:
            raise LeaseNotFound(lease_id)

    def _put_sync(self, key: str, value: bytes, if_revision: int | None, lease: int | None) -> KeyValue:
        conn = self._db()
        with self._txn(conn):
            if lease is not None:
                self._check_lease(conn, lease, time.time())
            current = self._get_sync(conn, key)
            self._check(key, current, if_revision)
            kv = self._write_kv(conn, key, value, current, self._bump(conn), lease)
        return kv

    def _delete_sync(self, key: str, if_revision: int | None) -> bool:
        conn = self._db()
        with self._txn(conn):
            current = self._get_sync(conn, key)
            if current is None:
                return False
            self._check(key, current, if_revision)
            self._delete_kv(conn, key, self._bump(conn))
        return True

    def _txn_sync(
        self,
        items: builtins.list[tuple[str, bytes, int | None]],
        deletes: builtins.list[tuple[str, int | None]],
        prefixes: builtins.list[str],
        unchanged: builtins.list[tuple[str, int]],
    ) -> int:
        conn = self._db()
        with self._txn(conn):
            # Check everything before writing anything: a Conflict leaves the store untouched.
            currents = [self._get_sync(conn, key) for key, _, _ in items]
            for (key, _, if_rev), current in zip(items, currents, strict=True):
                self._check(key, current, if_rev)
            doomed: dict[str, None] = {}  # ordered: prefixes first, then the keys, as given
            for prefix in prefixes:
                where, args = _prefix_clause(prefix)
                for (key,) in conn.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args):
                    doomed[key] = None
            for key, if_rev in deletes:
                current = self._get_sync(conn, key)
                self._check(key, current, if_rev)
                if current is not None:
                    doomed[key] = None
            for key, rev in unchanged:  # after the deletes, as etcd's backend names the Conflict
                self._check(key, self._get_sync(conn, key), rev)
            if not items and not doomed:
                return self._meta(conn, "revision")
            rev = self._bump(conn)
            for key in doomed:
                self._delete_kv(conn, key, rev)
            for (key, value, _), current in zip(items, currents, strict=True):
                self._write_kv(conn, key, value, current, rev, None)  # never under a deleted prefix
        return rev

    def _events_sync(self, prefix: str, after: int) -> builtins.list[Event]:
        conn = self._db()
        where, args = _prefix_clause(prefix)
        select = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where}"
        with self._txn(conn, "DEFERRED"):  # the compaction check and the read see one snapshot
            compact = self._meta(conn, "compact_revision")
            if after < compact:
                raise Compacted(after, compact)
            rows = conn.execute(
                f"{select} AND rev > ? ORDER BY rev, id LIMIT ?", (*args, after, _WATCH_BATCH)
            ).fetchall()
            if len(rows) == _WATCH_BATCH:
                # Finish the last revision so the caller's cursor (a revision) skips nothing.
                last_id, last_rev = rows[-1][0], rows[-1][1]
                rows += conn.execute(
                    f"{select} AND rev = ? AND id > ? ORDER BY id", (*args, last_rev, last_id)
                ).fetchall()
        events = []
        for _id, rev, key, type_, value, create_rev, version, lease in rows:
            kv = None if type_ == "DELETE" else KeyValue(key, value, create_rev, rev, version, lease)
            events.append(Event(type_, key, kv, rev))
        return events

    def _grant_sync(self, ttl: float) -> int:
        conn = self._db()
        with self._txn(conn):
            cur = conn.execute("INSERT INTO leases (ttl, expires_at) VALUES (?, ?)", (ttl, time.time() + ttl))
        lease_id = cur.lastrowid
        assert lease_id is not None
        return lease_id

    def _keepalive_sync(self, lease_id: int) -> None:
        conn = self._db()
        now = time.time()
        with self._txn(conn):
            # An expired lease stays dead even if the sweeper has not removed it yet.
            cur = conn.execute(
                "UPDATE leases SET expires_at = ? + ttl WHERE id = ? AND expires_at > ?",
                (now, lease_id, now),
            )
            if cur.rowcount == 0:
                raise LeaseNotFound(lease_id)

    def _drop_lease(self, conn: sqlite3.Connection, lease_id: int) -> bool:
        """Delete a lease and its keys (one revision for all of them, as etcd does)."""
        conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        rows = conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,))
        keys = [row[0] for row in rows]
        if not keys:
            return False
        rev = self._bump(conn)
        for key in keys:
            self._delete_kv(conn, key, rev)
        return True

    def _revoke_sync(self, lease_id: int) -> None:
        conn = self._db()
        with self._txn(conn):
            if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                raise LeaseNotFound(lease_id)
            self._drop_lease(conn, lease_id)

    def _expire_sync(self) -> None:
        conn = self._db()
        now = time.time()
        # Cheap read first: most sweeps find nothing and should not take the write lock or fsync.
        if conn.execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (now,)).fetchone() is None:
            return
        with self._txn(conn):
            expired = [row[0] for row in conn.execute("SELECT id FROM leases WHERE expires_at <= ?", (now,))]
            for lease_id in expired:
                self._drop_lease(conn, lease_id)
