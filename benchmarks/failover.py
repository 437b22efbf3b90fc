"""A node killed under steady load on a real three-node cluster: how long until its instances serve
elsewhere, and what failed; then a config push to 100 instances over the three nodes.

Each run starts a fresh cluster (`_platform.running_cluster`: etcd, `osless server --etcd` and three
`osless node join` nodes, n1..n3 on 127.0.0.2..4), deploys tests/apps/holder at `--instances`
instances (min = max, so the autoscaler adds none) spread over the three nodes, and sends requests
back to back (each held `--hold` seconds by the app, so some are in flight at the kill) from
`--clients` clients split over TWO gateways, n1's and n2's. Then one node's `osless node join` gets
SIGKILL (its gateway, relay and instances go with it). Two cases, each `--runs` times:

- `other`: n3 is killed, a node whose gateway carries no load;
- `gateway`: n2 is killed, one of the two load gateways' nodes: its clients' failures after the
  kill are expected (nothing answers on that address any more), counted apart as `killed_gateway`.

Reported per case (medians over the runs): `replaced_s`, seconds from the kill until the app has
all its instances ready again on live nodes (target 10 s or less; Kubernetes' default is about
300 s, the toleration of an unreachable node before its pods are evicted); `routes_gone_s`, until the
dead node's instances are gone from the API (its lease ran out); requests served and failed. A
failure on a surviving gateway is explained when the request was sent before the dead node's
instances were gone from the API plus `ROUTE_SLACK_S` (the gateways' watch catching up): it was in
flight on the dead node, or routed there while its lease still held (`in_flight_at_kill`,
`routed_while_lease_held`); any other failure is `unexplained`, and makes `target_met` false.

The config push: on one more cluster, benchmarks/apps/config_push at `--push-instances` instances
spread over the three nodes, timed the way benchmarks/config_push.py times it (its own code): from
just before the PATCH to the last instance's own `config_applied_at` for the new version, p99 over
`--push-reps` pushes (target 50 ms or less); then, as the baseline, the same on a one-node cluster
(`config_push_one_node`: what the spread over three nodes adds).

Prints one JSON object as its last line; `target_met` is false on any unexplained failure or a
missed target.

Measured (this 2-core machine, shared with other work, load average 4 to 20; a full run takes about
5 minutes; two full runs): instances ready again on the live nodes 2.3 to 3.3 s after the kill,
medians 2.6 and 3.1 s when the killed node carried no load, 3.0 and 2.5 s when it was a load
gateway's: the rest of its 3 s lease, the scheduler acting on the lease's end at once, and a fork
from the release's warm zygote. On the surviving gateways the only failures were the 1 to 3
requests in flight on the dead node (HTTP 502), and once one sent to it 10 ms after the kill; none
unexplained. With the gateways' retries (a bodiless GET that failed before any byte of its answer
goes to another instance; a relay that failed is skipped for a while), two runs per case, load
4.9: none failed on the surviving gateways, in flight or after; replaced in 2.7 to 2.9 s. The
killed gateway's own clients fail from the kill on (nothing listens there: a load
balancer in front must drop it).

Config push to 100 instances (`--only push` runs it alone). Where the time went, from timestamps
taken at each hop (p50 of 50 pushes over three nodes, at load 1 to 3): 5.5 ms until the PATCH
writes to the store (2.7 of them before its handler runs), 1.3 ms until the API's watch sees the
change, then each node's watch read the placement (every instance) on its own, one after another
on the API's loop: 3.5 ms, the last node 4.4 ms behind the first; 1 ms to the agent, 1 ms
through its zygote, and 15 ms from the first instance applying it to the last. That last hop is
the CPU: waking a process costs about 130 us on this VM (a bare uvloop loop as much as an
instance), so 100 instances need 13 ms of CPU, on two cores shared with everything else and
behind the apps' low CPU weight (a quarter of a platform process, on purpose); an idle instance
also woke ten times a second (uvicorn's loop), 12% of a core for 100. Changed: one placement read
per change for all the nodes' watches (the last node 0.4 ms behind the first), the PATCH's reads
side by side, a push to each zygote on its own task, idle instances waking once a second.
Before, at load 1: p50 25.5 ms, p99 58 ms over three nodes (one node, same run: 18.6 and 35 ms).
After, alternated with the code before in the same hour, at load 5 to 22 from other work on the
machine (medians of the runs; five runs after, four before): three nodes p50 37 ms, p99 311 ms
(before: 48 and 317 ms), one node p50 34, p99 88 ms (before: 41 and 400 ms); the runs' p99 over
three nodes spread from 92 to 807 ms after, 68 to 484 ms before. p99 at these loads is the
machine's, not the platform's; the 50 ms target over three nodes was not shown met here.
With the machine quiet (load 0.3 to 2.8, three runs of `--only push` after every change of the
session had landed): three nodes p50 19.0 to 19.4 ms, p99 27.6 to 33.7 ms (median 32.8 ms: the
50 ms target met); one node p50 14.0 to 18.1 ms, p99 22.8 to 36.1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from _platform import ROOT, Cluster, running_cluster
from config_push import APP as PUSH_APP
from config_push import APP_DIR as PUSH_APP_DIR
from config_push import push, summary_ms

HOLDER = ROOT / "tests" / "apps" / "holder"
APP = "holder"
TARGET_REPLACED_S = 10.0
TARGET_PUSH_P99_MS = 50.0
ROUTE_SLACK_S = 1.0  # a gateway learns of deleted instances through its watch: allow it this long
GATEWAYS = ("n1", "n2")  # the load goes through these nodes' gateways
KILLED = {"other": "n3", "gateway": "n2"}


@dataclass
class Sent:
    gateway: str  # the node whose gateway it went through
    start: float  # monotonic
    end: float
    ok: bool
    why: str = ""


@dataclass
class Load:
    """Clients sending GET back to back, split over gateways, until stopped; every request recorded."""

    urls: dict[str, str]  # node name -> the app's URL on its gateway
    clients: int
    hold: float
    sent: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, node: str) -> None:
        url = f"{self.urls[node]}?s={self.hold}"
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = c.get(url)
                    ok, why = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                end = time.monotonic()
                with self._lock:
                    self.sent.append(Sent(node, start, end, ok, "" if ok else why))
                if not ok:
                    time.sleep(0.05)  # a dead address refuses at once: do not spin on it

    def __enter__(self) -> Load:
        nodes = list(self.urls)
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(nodes[k % len(nodes)],), daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def api_client(cluster: Cluster) -> httpx.Client:
    server = cluster.server
    return httpx.Client(base_url=server.api, headers={"authorization": f"Bearer {server.token}"}, timeout=30)


def instances(api: httpx.Client, app: str) -> list[dict[str, Any]]:
    r = api.get("/v1/instances", params={"app": app})
    r.raise_for_status()
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def ready(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if i["status"]["phase"] == "ready"]


def wait(what: str, check: Any, timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def spread(api: httpx.Client, app: str, n: int, nodes: int, timeout: float) -> list[dict[str, Any]]:
    """Wait for exactly `n` instances of `app`, all ready, on `nodes` distinct nodes."""

    def check() -> list[dict[str, Any]] | None:
        items = instances(api, app)
        r = ready(items)
        return r if len(items) == n and len(r) == n and len({i["node"] for i in r}) == nodes else None

    found: list[dict[str, Any]] = wait(f"{n} instances of {app} on {nodes} nodes", check, timeout, 0.2)
    return found


def failover_run(case: str, args: argparse.Namespace) -> dict[str, Any]:
    dead = KILLED[case]
    with running_cluster("oslfo-", nodes=3) as cluster:
        api = api_client(cluster)
        server = cluster.server
        server.cli("deploy", str(HOLDER), timeout=600)
        server.cli("scale", APP, "--min", str(args.instances), "--max", str(args.instances))
        before = spread(api, APP, args.instances, 3, 300)
        on_dead = sum(1 for i in before if i["node"] == dead)
        node = {n.name: n for n in cluster.nodes}
        urls = {name: f"{node[name].gateway}/{APP}/" for name in GATEWAYS}
        with Load(urls, args.clients, args.hold) as load:
            time.sleep(args.steady)
            proc = node[dead].proc
            assert proc is not None
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            routes_gone = replaced = 0.0
            deadline = killed + args.replace_timeout
            while time.monotonic() < deadline:
                items = instances(api, APP)
                now = time.monotonic()
                if not routes_gone and all(i["node"] != dead for i in items):
                    routes_gone = now
                live = [i for i in ready(items) if i["node"] != dead]
                if routes_gone and len(live) == args.instances:
                    replaced = now
                    break
                time.sleep(0.05)
            time.sleep(args.steady)  # the load goes on a while on the replacements
        proc.wait()
        api.close()
    sent = list(load.sent)
    kinds: dict[str, list[Sent]] = {
        "killed_gateway": [],
        "in_flight_at_kill": [],
        "routed_while_lease_held": [],
        "unexplained": [],
    }
    explained_until = (routes_gone or time.monotonic()) + ROUTE_SLACK_S
    for s in sent:
        if s.ok:
            continue
        if s.gateway == dead and s.end >= killed:
            kinds["killed_gateway"].append(s)
        elif s.start < killed <= s.end:
            kinds["in_flight_at_kill"].append(s)
        elif killed <= s.start < explained_until:
            kinds["routed_while_lease_held"].append(s)
        else:
            kinds["unexplained"].append(s)
    failed = [s for s in sent if not s.ok]
    return {
        "case": case,
        "killed": dead,
        "instances_on_killed_node": on_dead,
        "replaced_s": round(replaced - killed, 2) if replaced else None,
        "routes_gone_s": round(routes_gone - killed, 2) if routes_gone else None,
        "served": sum(1 for s in sent if s.ok),
        "served_after_kill": sum(1 for s in sent if s.ok and s.start >= killed),
        "failed": len(failed),
        # Each of these retries every 50 ms on its dead address, so killed_gateway grows with time.
        "clients_on_killed_gateway": sum(
            1 for k in range(args.clients) if GATEWAYS[k % len(GATEWAYS)] == dead
        ),
        **{k: len(v) for k, v in kinds.items()},
        "unexplained_at_s": sorted({round(s.start - killed, 2) for s in kinds["unexplained"]})[:20],
        "failures": sorted({f"{s.gateway}: {s.why}" for s in failed}),
        "failed_after_kill_s": [
            round(min((s.start - killed for s in failed if s.end >= killed), default=0), 2),
            round(max((s.start - killed for s in failed if s.end >= killed), default=0), 2),
        ],
    }


def config_push_run(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    with running_cluster("oslcp-", nodes=nodes) as cluster:
        api = api_client(cluster)
        server = cluster.server
        t = time.monotonic()
        server.cli("deploy", str(PUSH_APP_DIR), timeout=600)
        n = args.push_instances
        server.cli("scale", PUSH_APP, "--min", str(n), "--max", str(n))
        up = spread(api, PUSH_APP, n, nodes, 600)
        scale_s = time.monotonic() - t
        per_node: dict[str, int] = {}
        for i in up:
            per_node[i["node"]] = per_node.get(i["node"], 0) + 1
        sockets = {i["id"]: i["status"]["control"] for i in up}
        for w in range(3):
            push(api, sockets, f"warm-{w}", args.push_timeout)
        records: list[dict[str, Any]] = []
        for rep in range(args.push_reps):
            time.sleep(0.1)  # neither round's tail overlaps the next
            records.append(
                push(api, sockets, f"v{rep}", args.push_timeout, args.push_poll_delay_ms / 1000)[0]
            )
        api.close()
    complete = [r["latency_s"] for r in records if r["latency_s"] is not None]
    latency = summary_ms(complete)
    return {
        "nodes": nodes,
        "instances": n,
        "per_node": dict(sorted(per_node.items())),
        "reps": args.push_reps,
        "poll_delay_ms": args.push_poll_delay_ms,
        "reps_complete": len(complete),
        "push_ms": latency,
        "push_first_instance_ms": summary_ms([r["first_s"] for r in records if r["first_s"] is not None]),
        "setup_s": round(scale_s, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "target_p99_ms": TARGET_PUSH_P99_MS,
        "met": len(complete) == args.push_reps and latency.get("p99", float("inf")) <= TARGET_PUSH_P99_MS,
    }


def median(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return round(statistics.median(got), 2) if got else None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh clusters per case")
    parser.add_argument("--cases", default="other,gateway", help="which node is killed: other, gateway")
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8, help="split over n1's and n2's gateways")
    parser.add_argument("--hold", type=float, default=0.05, help="seconds the app holds each request")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of load before the kill and after")
    parser.add_argument("--replace-timeout", type=float, default=60.0)
    parser.add_argument("--push-instances", type=int, default=100)
    parser.add_argument("--push-reps", type=int, default=50)
    parser.add_argument("--push-timeout", type=float, default=10.0)
    parser.add_argument(
        "--push-poll-delay-ms",
        type=float,
        default=100.0,
        help="wait this long after the PATCH answer before reading the instances, so that reading "
        "them does not compete with the push for the CPUs (the figure comes from their own clocks)",
    )
    parser.add_argument("--no-push", action="store_true", help="skip the config push")
    parser.add_argument(
        "--only", choices=("failover", "push"), help="run only the node failures, or only the config push"
    )
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c] if args.only != "push" else []
    if args.only == "failover":
        args.no_push = True
    if unknown := set(cases) - set(KILLED):
        parser.error(f"unknown case(s) {sorted(unknown)}: choose from {sorted(KILLED)}")

    t = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.runs):
        for case in cases:
            run = failover_run(case, args)
            print(json.dumps(run), flush=True)
            runs[case].append(run)
    pushed = one_node = None
    if not args.no_push:
        pushed = config_push_run(args, nodes=3)
        print(json.dumps(pushed), flush=True)
        one_node = config_push_run(args, nodes=1)  # the baseline: the same push on one node, this run
        print(json.dumps(one_node), flush=True)

    summary: dict[str, Any] = {}
    for case, rs in runs.items():
        summary[case] = {
            "killed": KILLED[case],
            "replaced_s_median": median([r["replaced_s"] for r in rs]),
            "replaced_s": [r["replaced_s"] for r in rs],
            "routes_gone_s_median": median([r["routes_gone_s"] for r in rs]),
            "instances_on_killed_node": [r["instances_on_killed_node"] for r in rs],
            "served_median": median([r["served"] for r in rs]),
            "failed": [r["failed"] for r in rs],
            "killed_gateway": [r["killed_gateway"] for r in rs],
            "in_flight_at_kill": [r["in_flight_at_kill"] for r in rs],
            "routed_while_lease_held": [r["routed_while_lease_held"] for r in rs],
            "unexplained": [r["unexplained"] for r in rs],
            "met": all(r["replaced_s"] is not None and r["replaced_s"] <= TARGET_REPLACED_S for r in rs),
        }
    unexplained = sum(sum(s["unexplained"]) for s in summary.values())
    result = {
        "benchmark": "failover",
        "nodes": 3,
        "instances": args.instances,
        "clients": args.clients,
        "load_gateways": list(GATEWAYS),
        "hold_s": args.hold,
        "runs": args.runs,
        "failover": summary,
        "target_replaced_s": TARGET_REPLACED_S,
        "kubernetes_default_s": 300,
        "config_push": pushed,
        "config_push_one_node": one_node,
        "unexplained_failures": unexplained,
        "total_s": round(time.monotonic() - t, 1),
        "host": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "target_met": (
            unexplained == 0
            and all(s["met"] for s in summary.values())
            and (pushed is None or bool(pushed["met"]))
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
