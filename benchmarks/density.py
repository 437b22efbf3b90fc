"""Density: N idle instances of examples/hello forked from one warm sandboxed zygote, memory per instance.

Each instance is forked into its own cgroups (memory, cpu, pids), as the node agent does, in batches
run concurrently; then every one is asked `GET /`, and its /proc/PID/smaps_rollup read: unique memory
(USS = Private_Clean + Private_Dirty) and proportional memory (PSS). Side by side, the baseline: the
same app in M fresh interpreters running uvicorn. Prints a JSON object as its last line.

    .venv/bin/python benchmarks/density.py [--instances 500] [--batch 20] [--baseline 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import _common as c

TARGET_USS_MB = 6.0
TARGET_INSTANCES = 500


def mem_summary(pids: list[int]) -> dict[str, Any]:
    uss, pss, rss = [], [], []
    for pid in pids:
        with contextlib.suppress(OSError):
            m = c.smaps_rollup(pid)
            uss.append(m["uss"])
            pss.append(m.get("Pss", 0))
            rss.append(m.get("Rss", 0))
    if not uss:
        return {"measured": 0}
    return {
        "measured": len(uss),
        "uss_mb_median": c.mb(statistics.median(uss)),
        "uss_mb_mean": c.mb(statistics.fmean(uss)),
        "uss_mb_max": c.mb(max(uss)),
        "pss_mb_median": c.mb(statistics.median(pss)),
        "pss_mb_mean": c.mb(statistics.fmean(pss)),
        "rss_mb_median": c.mb(statistics.median(rss)),
        "uss_mb_total": c.mb(sum(uss)),
    }


async def start_instances(
    platform: c.Platform, n: int, batch: int, batch_s: list[float]
) -> tuple[list[c.Instance], str | None]:
    """Fork up to `n` instances, `batch` at a time; stop at the first batch that fails, saying why."""
    started: list[c.Instance] = []

    async def one(i: int) -> c.Instance:
        inst = await platform.fork(f"d{i:04d}")
        started.append(inst)
        await asyncio.wait_for(asyncio.shield(inst.child.ready), 60)
        return inst

    ready: list[c.Instance] = []
    for first in range(0, n, batch):
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(one(i) for i in range(first, min(n, first + batch))), return_exceptions=True
        )
        batch_s.append(time.perf_counter() - t0)
        errors = [r for r in results if isinstance(r, BaseException)]
        ready += [r for r in results if isinstance(r, c.Instance)]
        if errors:
            e = errors[0]
            reason = f"{len(errors)} of the batch at instance {first} failed: {type(e).__name__}: {e}"
            not_ready = [i for i in started if i not in ready]
            await platform.kill(not_ready)
            return ready, reason
    return ready, None


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    nofile = c.raise_nofile()
    host_before = c.host()
    image = c.build_hello(work)
    platform = await c.Platform.start(work, image)
    instances: list[c.Instance] = []
    base_procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    try:
        agents = c.osless_agents()
        t0 = time.perf_counter()
        batch_s: list[float] = []
        instances, failure = await start_instances(platform, args.instances, args.batch, batch_s)
        start_s = time.perf_counter() - t0
        loop = asyncio.get_running_loop()
        t1 = time.perf_counter()
        answered = sum(
            await asyncio.gather(*(loop.run_in_executor(None, c.answers, i.sock, 10.0) for i in instances))
        )
        check_s = time.perf_counter() - t1
        pids = [i.child.pid for i in instances if i.child.pid_is_real]
        platform.pids.update(pids)
        osless_mem = mem_summary(pids)
        agents |= c.osless_agents()
        died = c.exit_statuses(instances)  # an instance should never end on its own here
        zpid = platform.release_zygote_pid()
        zygote_mem = c.smaps_rollup(zpid) if zpid else {}
        root_pid = platform.root.proc.pid if platform.root.proc else 0
        root_mem = c.smaps_rollup(root_pid) if root_pid else {}

        # Baseline: M fresh interpreters serving the same layers, all up at once.
        base_dir = work / "base"
        base_dir.mkdir()
        socks = [base_dir / f"b{i:02d}.sock" for i in range(args.baseline)]
        with (work / "fresh.log").open("ab") as err:
            for sock in socks:
                base_procs.append(
                    subprocess.Popen(
                        c.fresh_cmd(image, sock),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        platform.pids.update(p.pid for p in base_procs)
        base_answered = sum(
            await asyncio.gather(*(loop.run_in_executor(None, c.answers, s, 60.0, True) for s in socks))
        )
        base_mem = mem_summary([p.pid for p in base_procs])
    finally:
        for p in base_procs:
            c.stop_process(p)
        t2 = time.perf_counter()
        await platform.kill(instances)
        stop_s = time.perf_counter() - t2
        await platform.stop()
        leftover_cgroups = platform.leftover_cgroups()
        leftover_pids = await c.wait_gone(platform.pids)

    uss = osless_mem.get("uss_mb_median", float("inf"))
    result = {
        "benchmark": "density",
        "what": "idle instances of examples/hello from one warm sandboxed zygote, memory per instance (MB)",
        "requested": args.instances,
        "started": len(instances),
        "answered": answered,
        "failure": failure,
        "died_after_ready": died,
        "other_osless_agents_seen": len(agents),
        "start_s": round(start_s, 2),
        "check_s": round(check_s, 2),
        "stop_s": round(stop_s, 2),
        "batch": args.batch,
        "batch_start_ms": {
            "first": round(batch_s[0] * 1000, 1) if batch_s else None,
            "median": round(statistics.median(batch_s) * 1000, 1) if batch_s else None,
            "last": round(batch_s[-1] * 1000, 1) if batch_s else None,
        },
        "osless_instance": osless_mem,
        "zygote": {
            "rss_mb": c.mb(zygote_mem.get("Rss", 0)),
            "pss_mb": c.mb(zygote_mem.get("Pss", 0)),
            "uss_mb": c.mb(zygote_mem.get("uss", 0)),
        },
        "root_zygote": {"rss_mb": c.mb(root_mem.get("Rss", 0)), "pss_mb": c.mb(root_mem.get("Pss", 0))},
        "baseline_fresh_interpreter": {"count": args.baseline, "answered": base_answered, **base_mem},
        "ratio_uss_baseline_over_osless": round(base_mem.get("uss_mb_median", 0) / uss, 1) if uss else None,
        "rlimit_nofile": nofile,
        "targets": {"uss_mb_per_instance": TARGET_USS_MB, "instances_answering": TARGET_INSTANCES},
        "meets_uss": uss < TARGET_USS_MB,
        "meets_all_answering": answered == args.instances >= TARGET_INSTANCES,
        "host_before": host_before,
        "host_after": c.host(),
        "leftover_cgroups": leftover_cgroups,
        "leftover_pids": leftover_pids,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=TARGET_INSTANCES, help="idle instances to start")
    parser.add_argument("--batch", type=int, default=20, help="instances forked concurrently")
    parser.add_argument("--baseline", type=int, default=10, help="fresh interpreters for the baseline")
    args = parser.parse_args()
    work = c.make_workdir()
    try:
        result = asyncio.run(run(args, work))
    finally:
        c.remove_workdir(work)
    result["workdir_removed"] = not work.exists()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
