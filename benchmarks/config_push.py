"""Live config push: from `PATCH /v1/apps/APP/config` to every running instance having applied it.

A real `osless up` in a subprocess; the app of benchmarks/apps/config_push deployed with the CLI and
scaled to N instances. Each repetition sets `greeting` to a new value and reads every instance's
`/health` over its control socket until all report the new `config_version`; the latency is
the latest `config_applied_at` (the instance's own clock reading when it applied that version) minus
the time just before the PATCH was sent, so polling adds no error to it. The wall time until the
polling saw every instance is reported too, as a secondary figure.

Side by side, the baseline, interleaved round by round: the same PATCH on a second deploy of the same
code (`--name config-push-idle`) scaled to zero instances: the same API write, store commit and watch
event, but nothing to deliver (its idle zygote, kept warm a while by the agent, still gets the change;
only the PATCH round trip is timed). The difference is what the push to the instances costs.
Prints a JSON object as its last line.

    .venv/bin/python benchmarks/config_push.py [--instances 100] [--reps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _platform import Platform, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP_DIR = ROOT / "benchmarks" / "apps" / "config_push"
APP = "config-push"
IDLE_APP = "config-push-idle"
TARGET_P99_MS = 20.0
SETTLE_S = 0.1  # between rounds
HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: instance\r\nConnection: close\r\n\r\n"


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
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


def health(path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The instance's health answer, over a fresh connection to its unix socket; None if unreachable."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(HEALTH_REQUEST)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    answer: dict[str, Any] = json.loads(body)
    return answer


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (instances, zygotes, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return sorted(out)


class Bench:
    def __init__(self, work: Path, instances: int) -> None:
        self.work = work
        self.data = work / "data"
        self.n = instances
        self.env = {**os.environ, "OSLESS_CONFIG_DIR": str(work / "cfg")}
        self.api_port, self.http_port = free_port(), free_port()
        self.up: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self, timeout: float = 60.0) -> None:
        platform = Platform(self.data, api_port=self.api_port, http_port=self.http_port)
        try:
            platform.start(timeout)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        assert platform.proc is not None
        self.up, self.env = platform.proc, platform.env
        self.client = httpx.Client(
            base_url=platform.api, headers={"authorization": f"Bearer {platform.token}"}, timeout=30
        )

    def cli(self, *args: str) -> None:
        r = subprocess.run(
            [str(BIN / "osless"), *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        if r.returncode != 0:
            raise SystemExit(f"osless {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")

    def instances(self, app: str) -> list[dict[str, Any]]:
        assert self.client is not None
        r = self.client.get("/v1/instances", params={"app": app})
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    def wait_ready(self, app: str, n: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            items = self.instances(app)
            ready = [i for i in items if i["status"]["phase"] == "ready" and i["status"].get("socket")]
            if len(ready) == n and len(items) == n:
                return ready
            if time.monotonic() > deadline:
                phases: dict[str, int] = {}
                for i in items:
                    phases[i["status"]["phase"]] = phases.get(i["status"]["phase"], 0) + 1
                raise SystemExit(f"{app}: {len(ready)} of {n} instances ready after {timeout}s: {phases}")
            time.sleep(0.2)

    def patch(self, app: str, value: str) -> tuple[float, float, int]:
        assert self.client is not None
        return patch(self.client, app, value)

    def stop(self) -> list[int]:
        """SIGTERM `osless up` and wait; returns the pids of its processes still alive after (killed)."""
        if self.client is not None:
            self.client.close()
        if self.up is None:
            return []
        tree = descendants(self.up.pid)
        if self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(30)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait()
        deadline = time.monotonic() + 5
        while (left := alive(tree)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:  # only processes of this run's own tree
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def patch(client: httpx.Client, app: str, value: str) -> tuple[float, float, int]:
    """(t0, t_response) on the wall clock, and the new config version."""
    t0 = time.time()
    r = client.patch(f"/v1/apps/{app}/config", json={"set": {"greeting": value}})
    t1 = time.time()
    if r.status_code != 200:
        raise SystemExit(f"PATCH {app} config: {r.status_code} {r.text}")
    return t0, t1, int(r.json()["version"])


def push(
    client: httpx.Client,
    sockets: dict[str, str],
    value: str,
    timeout: float,
    delay: float = 0.0,
    app: str = APP,
) -> tuple[dict[str, Any], float]:
    """One PATCH, then every instance's health (over its control socket, on this machine) until all
    show the new version: on one node or a cluster's nodes alike.

    Returns the round's figures (seconds from t0, just before the PATCH) and the PATCH round trip.
    """
    t0, t1, version = patch(client, app, value)
    if delay:
        time.sleep(delay)  # reading the instances meanwhile would compete with the push for the CPUs
    pending = dict(sockets)
    applied: dict[str, float | None] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for iid, path in list(pending.items()):
            h = health(path)
            if h is not None and int(h.get("config_version", 0)) >= version:
                del pending[iid]
                if int(h["config_version"]) == version:
                    applied[iid] = h.get("config_applied_at")
                else:  # already past it: cannot tell when this version landed
                    applied[iid] = None
        if pending:
            time.sleep(0.0005)
    polled = time.time() - t0
    stamps = [a for a in applied.values() if a is not None]
    record: dict[str, Any] = {
        "version": version,
        "reached": len(applied),
        "without_time": len(applied) - len(stamps),
        "latency_s": (max(stamps) - t0) if len(stamps) == len(sockets) else None,
        "first_s": (min(stamps) - t0) if stamps else None,
        "after_answer_s": (max(stamps) - t1) if len(stamps) == len(sockets) else None,
        "polled_s": polled,
    }
    return record, t1 - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="untimed pushes first")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a push may take per rep")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument(
        "--poll-delay-ms",
        type=float,
        default=0.0,
        help="wait this long after the PATCH answer before reading the instances (the main figure "
        "comes from their own clocks, so it does not depend on when they are read)",
    )
    args = parser.parse_args()

    # Short path on purpose: instance sockets live below it and must stay under 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="oslbench-", dir="/tmp"))
    bench = Bench(work, args.instances)
    records: list[dict[str, Any]] = []
    patch_rtt: list[float] = []
    base_rtt: list[float] = []
    setup: dict[str, float] = {}
    restarts = 0
    left: list[int] = []
    try:
        t = time.perf_counter()
        bench.start()
        client = bench.client
        assert client is not None
        setup["up_s"] = time.perf_counter() - t
        t = time.perf_counter()
        bench.cli("deploy", str(APP_DIR))
        # The baseline: the same code and schema as another app, with no instance to reach.
        bench.cli("deploy", str(APP_DIR), "--name", IDLE_APP, "--detach")
        bench.cli("scale", IDLE_APP, "--min", "0", "--max", "1", "--idle", "1")
        setup["deploy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        bench.cli("scale", APP, "--min", str(args.instances), "--max", str(args.instances))
        ready = bench.wait_ready(APP, args.instances, args.ready_timeout)
        bench.wait_ready(IDLE_APP, 0, 60)
        setup["scale_s"] = time.perf_counter() - t
        sockets = {i["id"]: i["status"]["control"] for i in ready}
        restarts_before = sum(int(i["status"].get("restarts", 0)) for i in ready)

        for w in range(args.warmup):
            push(client, sockets, f"warm-{w}", args.timeout)
            bench.patch(IDLE_APP, f"warm-{w}")
        for rep in range(args.reps):
            # A pause between rounds, so that neither round's tail (the agent handling the last
            # change) overlaps the next one.
            time.sleep(SETTLE_S)
            record, rtt = push(client, sockets, f"v{rep}", args.timeout, args.poll_delay_ms / 1000)
            records.append(record)
            patch_rtt.append(rtt)
            time.sleep(SETTLE_S)
            t0, t1, _ = bench.patch(IDLE_APP, f"v{rep}")
            base_rtt.append(t1 - t0)

        after = bench.instances(APP)
        restarts = sum(int(i["status"].get("restarts", 0)) for i in after) - restarts_before
        same_set = {i["id"] for i in after} == set(sockets)
    finally:
        left = bench.stop()
        shutil.rmtree(work, ignore_errors=True)

    complete = [r for r in records if r["latency_s"] is not None]
    latency = summary_ms([r["latency_s"] for r in complete])
    result = {
        "benchmark": "config_push",
        "what": (
            "PATCH /v1/apps/APP/config to the last of N running instances having applied the new "
            "version (its own config_applied_at), ms"
        ),
        "instances": args.instances,
        "reps": args.reps,
        "poll_delay_ms": args.poll_delay_ms,
        "push_ms": latency,
        "push_first_instance_ms": summary_ms([r["first_s"] for r in records if r["first_s"] is not None]),
        "push_seen_by_polling_ms": summary_ms([r["polled_s"] for r in complete]),
        "push_patch_rtt_ms": summary_ms(patch_rtt),
        "push_after_patch_answer_ms": summary_ms([r["after_answer_s"] for r in complete]),
        "baseline_patch_no_instances_ms": summary_ms(base_rtt),
        "push_minus_baseline_p50_ms": round(
            latency.get("p50", math.nan) - percentile(base_rtt, 50) * 1000, 2
        ),
        "reached_per_rep": [r["reached"] for r in records],
        "reps_complete": len(complete),
        "instances_without_applied_time": sum(r["without_time"] for r in records),
        "instance_restarts": restarts,
        "instances_unchanged": same_set,
        "leftover_processes": len(left),
        "setup_s": {k: round(v, 1) for k, v in setup.items()},
        "host": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": len(complete) == args.reps and latency.get("p99", math.inf) < TARGET_P99_MS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
