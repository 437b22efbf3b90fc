"""The state store: KV semantics, revisions, CAS, transactions, watches, leases, durability."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from osless.store import (
    MAX_VALUE_BYTES,
    Compacted,
    Conflict,
    Event,
    LeaseNotFound,
    SQLiteStore,
    Store,
    StoreError,
    ValueTooLarge,
    open_store,
)
from osless.store.sqlite import _prefix_end

# Small sweep interval so lease tests take tenths of a second, not seconds.
SWEEP = 0.02


def run_with_store(
    tmp_path: Path, body: Callable[[SQLiteStore], Awaitable[None]], *, history: int = 10_000
) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db", history=history, sweep_interval=SWEEP) as store:
            await asyncio.wait_for(body(store), timeout=5)

    asyncio.run(main())


async def take(events: AsyncIterator[Event], n: int, timeout: float = 2.0) -> list[Event]:
    async def collect() -> list[Event]:
        out: list[Event] = []
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(collect(), timeout)


def summary(events: list[Event]) -> list[tuple[str, str, bytes | None, int]]:
    return [(e.type, e.key, None if e.kv is None else e.kv.value, e.revision) for e in events]


# -- basic KV ---------------------------------------------------------------------------------------


def test_get_put_list_delete(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.get("/apps/a") is None
        assert await store.list("/apps/") == ([], 0)

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
        assert rev == await store.revision() == 4
        everything, _ = await store.list("")
        assert [i.key for i in everything] == ["/apps/a", "/apps/b", "/appsx", "/other/a"]

        assert await store.delete("/apps/a") is True
        assert await store.delete("/apps/a") is False
        assert await store.get("/apps/a") is None
        assert [i.key for i in (await store.list("/apps/"))[0]] == ["/apps/b"]
        assert await store.revision() == 5  # a delete of an absent key writes nothing

    run_with_store(tmp_path, body)


def test_revisions_versions(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a1 = await store.put("/a", b"1")
        b1 = await store.put("/b", b"1")
        a2 = await store.put("/a", b"2")
        assert (a1.create_revision, a1.mod_revision, a1.version) == (1, 1, 1)
        assert (b1.create_revision, b1.mod_revision, b1.version) == (2, 2, 1)
        assert (a2.create_revision, a2.mod_revision, a2.version) == (1, 3, 2)
        await store.delete("/a")
        a3 = await store.put("/a", b"3")  # re-created: a new life
        assert (a3.create_revision, a3.mod_revision, a3.version) == (5, 5, 1)
        assert await store.revision() == 5

    run_with_store(tmp_path, body)


def test_cas(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        created = await store.put("/k", b"1", if_revision=0)
        with pytest.raises(Conflict) as info:
            await store.put("/k", b"again", if_revision=0)
        assert (info.value.key, info.value.expected, info.value.actual) == ("/k", 0, created.mod_revision)

        updated = await store.put("/k", b"2", if_revision=created.mod_revision)
        with pytest.raises(Conflict) as info:
            await store.put("/k", b"stale", if_revision=created.mod_revision)
        assert (info.value.expected, info.value.actual) == (created.mod_revision, updated.mod_revision)
        with pytest.raises(Conflict):
            await store.put("/absent", b"x", if_revision=7)

        with pytest.raises(Conflict):
            await store.delete("/k", if_revision=created.mod_revision)
        with pytest.raises(Conflict):
            await store.delete("/k", if_revision=0)
        assert await store.delete("/absent", if_revision=3) is False
        assert await store.delete("/k", if_revision=updated.mod_revision) is True

        assert await store.revision() == 3  # failed checks did not bump the revision
        with pytest.raises(ValueError):
            await store.put("/k", b"x", if_revision=-1)

    run_with_store(tmp_path, body)


def test_txn_put_many(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
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

        # One failing check: nothing written, revision unchanged.
        with pytest.raises(Conflict) as info:
            await store.txn_put_many([("/new", b"n", 0), ("/apps/a", b"v3", old.mod_revision)])
        assert info.value.key == "/apps/a"
        assert await store.get("/new") is None
        assert await store.revision() == rev
        assert await store.txn_put_many([]) == rev
        with pytest.raises(ValueError):
            await store.txn_put_many([("/x", b"1", None), ("/x", b"2", None)])

    run_with_store(tmp_path, body)


def test_values_past_the_limit_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        assert MAX_VALUE_BYTES == 1024 * 1024
        at_limit = await store.put("/big", b"x" * MAX_VALUE_BYTES)
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


def test_txn_deletes_keys_and_prefixes_with_puts_in_one_revision(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        app = await store.put("/apps/a", b"a")
        for key in ("/releases/a/1", "/releases/a/2", "/releases/ab/1", "/config/a", "/instances/i1"):
            await store.put(key, b"x")
        before = await store.revision()
        watch = store.watch("/", after_revision=before)
        with pytest.raises(Conflict) as info:  # the app changed since it was read: nothing is deleted
            await store.txn(deletes=[("/apps/a", app.mod_revision + 1)], delete_prefixes=["/releases/a/"])
        assert info.value.key == "/apps/a"
        assert len((await store.list("/releases/a/"))[0]) == 2 and await store.revision() == before

        rev = await store.txn(
            deletes=[("/apps/a", app.mod_revision), ("/config/a", None), ("/never", None)],
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

    run_with_store(tmp_path, body)


def test_a_txn_cut_by_kill_9_is_all_or_nothing(tmp_path: Path) -> None:
    """Deleting 20,000 keys in one transaction while being killed: after it, all or none are there."""
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


def test_watch_history_then_live_in_order_and_prefix_only(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.put("/i/1", b"a")  # rev 1, before the watch point
        await store.put("/i/2", b"b")  # rev 2
        await store.put("/other", b"x")  # rev 3, another prefix
        await store.delete("/i/1")  # rev 4
        await store.txn_put_many([("/i/3", b"c", None), ("/ix", b"not mine", None), ("/i/4", b"d", 0)])  # 5

        async with contextlib.aclosing(store.watch("/i/", after_revision=1)) as events:
            history = await take(events, 4)
            assert summary(history) == [
                ("PUT", "/i/2", b"b", 2),
                ("DELETE", "/i/1", None, 4),
                ("PUT", "/i/3", b"c", 5),
                ("PUT", "/i/4", b"d", 5),
            ]
            assert history[0].kv is not None and history[0].kv.create_revision == 2

            async def writer() -> None:
                await store.put("/other", b"y")  # 6
                await store.put("/i/2", b"b2")  # 7
                await store.delete("/i/2")  # 8
                await store.put("/i/5", b"e")  # 9

            task = asyncio.create_task(writer())
            live = await take(events, 3)
            await task
            assert summary(live) == [
                ("PUT", "/i/2", b"b2", 7),
                ("DELETE", "/i/2", None, 8),
                ("PUT", "/i/5", b"e", 9),
            ]
            kv = live[0].kv
            assert kv is not None and (kv.version, kv.create_revision, kv.mod_revision) == (2, 2, 7)

    run_with_store(tmp_path, body)


def test_watch_many_watchers_and_large_history(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        # More events than one read batch, with a transaction straddling the batch edge.
        for i in range(499):
            await store.put(f"/k/{i:04}", b"x")
        await store.txn_put_many([(f"/k/t{i}", b"t", None) for i in range(10)])
        watchers = [store.watch("/k/", after_revision=0) for _ in range(3)]
        try:
            results = await asyncio.gather(*(take(w, 509) for w in watchers))
        finally:
            for w in watchers:
                await w.aclose()
        for events in results:
            assert [e.revision for e in events] == [*range(1, 500), *[500] * 10]

    run_with_store(tmp_path, body)


def test_watch_reads_the_table_then_memory_and_both_agree(tmp_path: Path) -> None:
    """More events than the store keeps in memory: an old cursor reads the table until memory
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

    run_with_store(tmp_path, body)

    async def reopened() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            assert not store._recent
            got = await take(store.watch("/m/", after_revision=25), 1251, timeout=10)
            assert [(e.revision, e.key) for e in got] == [*expected[25 * 50 :], (51, "/m/live")]

    asyncio.run(reopened())


def test_watch_stops_cleanly(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.put("/w/1", b"1")
        async for _event in store.watch("/w/", after_revision=0):
            assert store._watchers == 1
            break
        for _ in range(5):  # the loop's async-generator hook closes it on a later turn
            await asyncio.sleep(0)
        assert store._watchers == 0

        # A watcher cancelled while waiting for live events.
        task = asyncio.create_task(take(store.watch("/w/", after_revision=1), 1, timeout=10))
        await asyncio.sleep(0.05)
        assert store._watchers == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)
        assert store._watchers == 0

    run_with_store(tmp_path, body)


def test_close_ends_waiting_watch(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.db")
        await store.start()
        task = asyncio.create_task(take(store.watch("/", after_revision=0), 1))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StoreError):
            await task
        with pytest.raises(StoreError):
            await store.get("/x")

    asyncio.run(main())


def test_compacted(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        for i in range(10):
            await store.put("/c", str(i).encode())
        # history=3 keeps revisions 8, 9, 10: a watch from 7 still sees everything after it.
        with pytest.raises(Compacted) as info:
            await take(store.watch("/c", after_revision=6), 1)
        assert (info.value.requested, info.value.compact_revision) == (6, 7)
        async with contextlib.aclosing(store.watch("/c", after_revision=7)) as events:
            assert [e.revision for e in await take(events, 3)] == [8, 9, 10]

    run_with_store(tmp_path, body, history=3)


def test_prefix_end() -> None:
    assert _prefix_end("/a/") == "/a0"
    assert _prefix_end("") is None
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("x\ud7ff") == "x\ue000"


# -- leases -----------------------------------------------------------------------------------------


def test_lease_expiry_deletes_keys_with_delete_events(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        lease = await store.grant_lease(0.15)
        await store.put("/nodes/n1", b"n1", lease=lease)
        await store.put("/nodes/n2", b"n2", lease=lease)
        kept = await store.put("/nodes/n3", b"n3")
        assert (await store.get("/nodes/n1")) is not None
        rev = await store.revision()

        async with contextlib.aclosing(store.watch("/nodes/", after_revision=rev)) as events:
            deleted = await take(events, 2)
        assert summary(deleted) == [
            ("DELETE", "/nodes/n1", None, rev + 1),
            ("DELETE", "/nodes/n2", None, rev + 1),
        ]
        assert await store.get("/nodes/n1") is None
        assert await store.get("/nodes/n3") == kept
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)
        with pytest.raises(LeaseNotFound):
            await store.put("/nodes/n4", b"x", lease=lease)

    run_with_store(tmp_path, body)


def test_keepalive_extends_and_revoke(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        lease = await store.grant_lease(0.2)
        await store.put("/nodes/n1", b"n1", lease=lease)
        for _ in range(6):  # 0.3 s in all, well past the ttl
            await asyncio.sleep(0.05)
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

    run_with_store(tmp_path, body)


def test_state_and_lease_expiry_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def first() -> tuple[int, int]:
        async with SQLiteStore(path, sweep_interval=SWEEP) as store:
            long = await store.grant_lease(60)
            short = await store.grant_lease(0.3)
            await store.put("/long", b"l", lease=long)
            await store.put("/short", b"s", lease=short)
            await store.put("/plain", b"p")
            return long, await store.revision()

    async def second(long: int, rev: int) -> None:
        await asyncio.sleep(0.35)  # the short lease expires while no store is running
        async with SQLiteStore(path, sweep_interval=SWEEP) as store:
            assert await store.revision() >= rev
            await asyncio.sleep(0.1)
            assert await store.get("/short") is None
            assert await store.get("/plain") is not None
            await store.keepalive(long)
            assert await store.get("/long") is not None
            assert await store.revision() == rev + 1
            assert await store.grant_lease(1) > long  # lease ids are never reused

    long, rev = asyncio.run(first())
    asyncio.run(second(long, rev))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- durability and open_store ----------------------------------------------------------------------


def test_acked_write_survives_sigkill(tmp_path: Path) -> None:
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
    """Watchers see a commit at once; the writer hears back only after an fsync that began after
    its commit, and concurrent writers share fsyncs rather than queue one each."""
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

    run_with_store(tmp_path, body)


def test_open_store(tmp_path: Path) -> None:
    store: Store = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "a.db"
    plain = open_store(str(tmp_path / "b.db"))
    assert isinstance(plain, SQLiteStore) and plain.path == tmp_path / "b.db"
    with pytest.raises(ValueError, match="sqlite:///"):
        open_store("etcd://127.0.0.1:2379")
    with pytest.raises(ValueError, match="absolute"):
        open_store("sqlite://relative.db")
    with pytest.raises(ValueError):
        open_store("")

    async def not_started() -> None:
        with pytest.raises(StoreError, match="start"):
            await store.get("/x")

    asyncio.run(not_started())
