"""Cold start of examples/hello: a sandboxed instance forked from its warm zygote, request to first byte.

Side by side in the same run: (a) osless, from the fork request to the first byte of the reply to
`GET /` on the new instance (a thread keeps trying to connect until the socket accepts), with the
time to its `ready` message as well; (b) the same app in a fresh interpreter (layers on sys.path,
uvicorn on a unix socket), from Popen to first byte; (c) the same as (b) inside bubblewrap, if `bwrap`
is installed. Prints a JSON object as its last line. A start that fails is not timed, but counted
(`failed_starts`): with any, no target is met (`target_met` false).

The headline (a) figures are lone cold starts: each after `--gap-ms` of quiet, as on a node that
starts an instance now and then. Forks one right after the other are reported too: they come out
faster, because some kernel work (the RCU grace period cgroup migration waits for) is shared by
starts close together.

    .venv/bin/python benchmarks/coldstart.py [--runs 100] [--baseline-runs 20] [--gap-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common as c

from osless.node.spawn import ChildExited

TARGET_P50_MS = 10.0
TARGET_P99_MS = 30.0
TARGET_RATIO = 15.0


async def osless_runs(
    platform: c.Platform, runs: int, warmup: int, *, gap: float, cgroup: bool = True, prefix: str = "c"
) -> tuple[dict[str, list[float]], list[str]]:
    """Fork to `ready`, and fork to first byte, of `runs` instances, each killed after measuring.

    A start that fails (an instance that dies or answers wrong) is not timed but reported, and
    counted: the caller fails the targets on any.
    """
    loop = asyncio.get_running_loop()
    out: dict[str, list[float]] = {"cgroup": [], "ready": [], "first_byte": []}
    interrupted: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as probe_thread:
        await loop.run_in_executor(probe_thread, time.sleep, 0)  # the thread exists before any timing
        i = 0
        while len(out["first_byte"]) < runs and len(interrupted) <= runs:
            iid = f"{prefix}{i:04d}"
            i += 1
            await asyncio.sleep(gap)
            t_cg = time.perf_counter()
            # As the agent does: the group is made and its limits written before the fork request.
            group = platform.new_cgroup() if cgroup else None
            t_cg_done = time.perf_counter()
            sock = platform.sock_dir / f"{iid}.sock"
            cancel = threading.Event()
            probe = loop.run_in_executor(
                probe_thread, functools.partial(c.get_first_byte, sock, 30.0, True, cancel)
            )
            t0 = time.perf_counter()
            inst = await platform.fork(iid, group, cgroup=cgroup)
            try:
                await asyncio.wait_for(asyncio.shield(inst.child.ready), 30)
                t_ready = time.perf_counter()
                reply = await probe
            except (ChildExited, OSError) as e:
                cancel.set()
                with contextlib.suppress(Exception):
                    await probe
                interrupted.append(f"{iid}: {type(e).__name__}: {e}")
                continue
            finally:
                await platform.kill([inst])
            if reply.status != 200 or c.EXPECTED_BODY not in reply.body:
                interrupted.append(f"{iid}: answered {reply.status} {reply.body[:200]!r}")
                continue
            if i > warmup:
                out["cgroup"].append(t_cg_done - t_cg)
                out["ready"].append(t_ready - t0)
                out["first_byte"].append(reply.first_byte - t0)
    if len(out["first_byte"]) < runs:
        raise SystemExit(
            f"{len(interrupted)} starts failed, {len(out['first_byte'])} succeeded: {interrupted[:5]}"
        )
    return out, interrupted


def process_runs(
    cmd_for: Any, sock_dir: Path, runs: int, warmup: int, log: Path
) -> tuple[list[float], set[int]]:
    """Popen to first byte of `GET /`, each process stopped after measuring."""
    times: list[float] = []
    pids: set[int] = set()
    with log.open("ab") as err:
        for i in range(warmup + runs):
            sock = sock_dir / f"b{i:04d}.sock"
            cmd = cmd_for(sock)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            pids.add(proc.pid)
            try:
                reply = c.get_first_byte(sock, 30.0)
            except OSError as e:
                c.stop_process(proc)
                tail = log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{cmd[0]} never answered on {sock}: {e}\n{tail}") from e
            c.stop_process(proc)
            sock.unlink(missing_ok=True)
            if reply.status != 200 or c.EXPECTED_BODY not in reply.body:
                raise SystemExit(f"{cmd[0]} answered {reply.status} {reply.body[:200]!r}")
            if i >= warmup:
                times.append(reply.first_byte - t0)
    return times, pids


def percentile_ms(seconds: list[float], p: float) -> float:
    return c.percentile([x * 1000 for x in seconds], p)


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    host_before = c.host()
    image = c.build_hello(work)
    platform = await c.Platform.start(work, image)
    leftover_cgroups: list[str] = []
    leftover_pids: list[int] = []
    try:
        # The probe thread and the loop share the GIL: switch often so neither waits 5 ms for the other.
        sys.setswitchinterval(0.0005)
        agents = c.osless_agents()
        gap = args.gap_ms / 1000
        osl, interrupted = await osless_runs(platform, args.runs, args.warmup, gap=gap)
        # The same forks one right after the other: what a burst of starts sees.
        burst, burst_interrupted = await osless_runs(platform, args.runs, args.warmup, gap=0, prefix="r")
        interrupted += burst_interrupted
        # Diagnostic, not a target: the same without joining cgroups, to show what joining costs.
        diag = None
        if args.diag_runs:
            diag, diag_interrupted = await osless_runs(
                platform, args.diag_runs, 1, gap=gap, cgroup=False, prefix="n"
            )
            interrupted += diag_interrupted
        sys.setswitchinterval(0.005)
        base_dir = work / "base"
        base_dir.mkdir()
        fresh, fresh_pids = process_runs(
            lambda s: c.fresh_cmd(image, s), base_dir, args.baseline_runs, 1, work / "fresh.log"
        )
        bwrap: list[float] | None = None
        bwrap_pids: set[int] = set()
        if c.bwrap_cmd(image, base_dir / "x.sock") is not None:
            bwrap, bwrap_pids = process_runs(
                lambda s: c.bwrap_cmd(image, s), base_dir, args.baseline_runs, 1, work / "bwrap.log"
            )
    finally:
        await platform.stop()
        leftover_cgroups = platform.leftover_cgroups()
        leftover_pids = await c.wait_gone(platform.pids)
    leftover_pids += c.alive(fresh_pids | bwrap_pids)

    a, a_ready, a_cg = (
        c.summary_ms(osl["first_byte"]),
        c.summary_ms(osl["ready"]),
        c.summary_ms(osl["cgroup"]),
    )
    b = c.summary_ms(fresh)
    clean = not interrupted  # a start that failed is a start the figures do not show: no target met
    result: dict[str, Any] = {
        "benchmark": "coldstart",
        "what": "examples/hello: start to first byte of GET / (ms); (a) fork from a warm sandboxed zygote, "
        "(b) fresh interpreter + uvicorn, (c) (b) in bubblewrap",
        "runs": {
            "gap_ms": args.gap_ms,
            "osless": args.runs,
            "baseline": args.baseline_runs,
            "warmup_discarded": args.warmup,
        },
        "osless_fork_to_first_byte_ms": a,
        "osless_fork_to_ready_ms": a_ready,
        "osless_cgroup_create_ms": a_cg,
        "osless_back_to_back_fork_to_first_byte_ms": c.summary_ms(burst["first_byte"]),
        "diagnostic_osless_without_cgroups_fork_to_first_byte_ms": (
            c.summary_ms(diag["first_byte"]) if diag else None
        ),
        "fresh_interpreter_ms": b,
        "bwrap_ms": c.summary_ms(bwrap) if bwrap is not None else "skipped: bwrap not on PATH",
        "ratio_fresh_over_osless_p50": round(b["p50"] / a["p50"], 1),
        "ratio_bwrap_over_osless_p50": round(percentile_ms(bwrap, 50) / a["p50"], 1) if bwrap else None,
        "targets": {
            "osless_p50_ms": TARGET_P50_MS,
            "osless_p99_ms": TARGET_P99_MS,
            "ratio_p50": TARGET_RATIO,
        },
        "failed_starts": len(interrupted),
        "meets_p50": clean and a["p50"] < TARGET_P50_MS,
        "meets_p99": clean and a["p99"] < TARGET_P99_MS,
        "meets_ratio": clean and b["p50"] / a["p50"] >= TARGET_RATIO,
        "interrupted_runs": interrupted,
        "other_osless_agents_seen": len(agents | c.osless_agents()),
        "host_before": host_before,
        "host_after": c.host(),
        "leftover_cgroups": leftover_cgroups,
        "leftover_pids": leftover_pids,
    }
    result["target_met"] = result["meets_p50"] and result["meets_p99"] and result["meets_ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100, help="osless instances to time")
    parser.add_argument(
        "--baseline-runs", type=int, default=20, help="fresh interpreters (and bwrap) to time"
    )
    parser.add_argument(
        "--gap-ms", type=float, default=100, help="quiet time before each osless start (lone cold starts)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="osless runs done first and discarded")
    parser.add_argument(
        "--diag-runs", type=int, default=30, help="extra osless runs without cgroups (diagnostic; 0: none)"
    )
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
