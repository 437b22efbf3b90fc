"""The usage store (`api.usage`): nodes' minutes added into hourly buckets, on a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from osless.api.usage import KEEP_S, add_usage, put_live, read_usage
from osless.store import SQLiteStore


def test_nodes_minutes_add_up_per_hour_and_old_hours_go(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
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
