"""The usage store (`api.usage`): nodes' minutes added into hourly buckets, on a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from osless.api.usage import KEEP_S, LIVE_PREFIX, add_usage, put_live, read_usage, top
from osless.store import SQLiteStore


def test_nodes_minutes_add_up_per_hour_and_old_hours_go(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            await store.put("/apps/a", b"{}")
            hour = int(time.time() // 3600 * 3600)
            old = hour - KEEP_S - 3600
            await add_usage(store, [{"hour": old, "app": "a", "function": "f", "invocations": 1.0}])
            # Two nodes at once, each a function's calls and the app's CPU: nothing lost to the race.
            rows = [
                {"hour": hour, "app": "a", "function": "f", "invocations": 2.0, "duration_s": 0.5},
                {"hour": hour, "app": "a", "function": "", "cpu_s": 1.5, "gb_s": 0.25, "cold_starts": 1.0},
            ]
            await asyncio.gather(add_usage(store, rows), add_usage(store, rows))
            # A live node's minute not stored yet counts too; a stale one's does not.
            now = time.time()
            await put_live(
                store, "n1", now, {}, [{"hour": hour, "app": "a", "function": "f", "invocations": 1.0}]
            )
            await put_live(
                store, "n2", now - 60, {}, [{"hour": hour, "app": "a", "function": "f", "invocations": 9.0}]
            )
            (found,) = await read_usage(store, "a", hour - 1, now)
            assert found["hour"] == hour
            assert found["functions"]["f"]["invocations"] == 5
            assert found["functions"]["f"]["duration_s"] == 1.0
            assert (found["cpu_s"], found["gb_s"], found["cold_starts"]) == (3.0, 0.5, 2.0)
            # The app's first figures of the hour made it forget the hours past what is kept.
            items, _ = await store.list("/usage/a/")
            assert [kv.key for kv in items] == [f"/usage/a/{hour}"]

    asyncio.run(main())


def test_usage_is_stored_only_while_its_app_exists(tmp_path: Path) -> None:
    """A node's last minute of an app, arriving after the app's delete, brings no hour back (a new
    app of the name would inherit it); an app changed meanwhile (a deploy) still gets its minute."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            hour = int(time.time() // 3600 * 3600)
            row = {"hour": hour, "app": "a", "function": "f", "invocations": 1.0}
            await add_usage(store, [row, {**row, "app": "never"}])
            assert (await store.list("/usage/"))[0] == []
            await store.put("/apps/a", b"{}")
            changes = [store.put("/apps/a", f'{{"n": {n}}}'.encode()) for n in range(20)]
            await asyncio.gather(add_usage(store, [row]), *changes)
            (found,) = await read_usage(store, "a", hour, time.time())
            assert found["functions"]["f"]["invocations"] == 1

    asyncio.run(main())


def test_top_merges_the_fresh_nodes_and_forgets_the_gone(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            now = time.time()
            buckets = [0] * 16
            buckets[2] = 10  # 10 answers between 2.5 and 5 ms

            def view(rps: float) -> dict[str, object]:
                app = {"requests_per_s": rps, "in_flight": 1, "memory": 1 << 20, "latency_buckets": buckets}
                inst = {"id": "a-1", "app": "a", "phase": "ready", "cpu": 0.5, "memory": 1 << 20}
                return {"apps": {"a": app, "gone": app}, "instances": [inst]}

            await put_live(store, "n1", now, view(3.0), [])
            await put_live(store, "n2", now - 1, view(4.0), [])
            await put_live(store, "n3", now - 3600, view(100.0), [])
            found = await top(store, now, ["a", "idle"])
            a = found["apps"]["a"]
            assert (a["requests_per_s"], a["in_flight"], a["instances"]) == (7.0, 2, 2)
            assert 2.5 < a["p50_ms"] < a["p99_ms"] <= 5.0
            assert found["apps"]["idle"]["p50_ms"] is None and "gone" not in found["apps"]
            assert sorted(i["node"] for i in found["instances"]) == ["n1", "n2"]
            items, _ = await store.list("/nodeusage/")
            assert [kv.key for kv in items] == ["/nodeusage/n1", "/nodeusage/n2"]

    asyncio.run(main())


def test_a_day_s_hours_read_key_by_key_are_those_a_listing_finds(tmp_path: Path) -> None:
    """A short span (the dashboard's day) reads its hours by key, not every hour the app kept: the
    same hours, with the live nodes' minutes, as the listing a long span makes."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            await store.put("/apps/a", b"{}")
            now = time.time()
            hour = int(now // 3600 * 3600)
            for h in range(hour - 72 * 3600, hour + 3600, 3600):  # three days, oldest first
                await add_usage(store, [{"hour": h, "app": "a", "function": "f", "invocations": h / 3600}])
            await put_live(
                store, "n1", now, {}, [{"hour": hour, "app": "a", "function": "f", "invocations": 1.0}]
            )
            since = now - 20 * 3600
            day = await read_usage(store, "a", since, now)
            listed = [
                h for h in await read_usage(store, "a", now - 30 * 86400, now) if h["hour"] + 3600 > since
            ]
            assert day == listed and len(day) == 21
            assert day[-1]["functions"]["f"]["invocations"] == hour / 3600 + 1
            live, _ = await store.list(LIVE_PREFIX)
            assert await read_usage(store, "a", since, now, live) == day

    asyncio.run(main())
