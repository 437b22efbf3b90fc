"""A node killed under steady load: how long until its instances serve elsewhere, and what failed.

Two nodes on this machine: `osless up`'s own and a second real node agent (tests/node_agent.py, with
a node token issued through the API; `osless node join` will take its place). tests/apps/holder at
`--instances` instances, spread over both; clients send requests back to back through the gateway
(which reaches the second node's instances too: they are unix sockets on this machine). Then the
second node's agent is killed with SIGKILL; its zygotes and instances die with it. Reported: the
seconds until the app has all its instances ready again on live nodes (target 10 s or less;
Kubernetes' default is about 300 s), the failed requests (those in flight on the dead node may
fail) and the requests served. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/failover.py [--instances 4] [--clients 8]

Not yet measured here: three nodes with two gateways, and the config push p99 to 100 instances over
three nodes (`benchmarks/config_push.py` measures it on one node); both wait for `osless cluster up`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _platform import running_platform

ROOT = Path(__file__).resolve().parent.parent
HOLDER = ROOT / "tests" / "apps" / "holder"


def _ready(api: httpx.Client, app: str) -> list[dict[str, Any]]:
    items = api.get("/v1/instances", params={"app": app}).json()["items"]
    return [i for i in items if i["status"]["phase"] == "ready"]


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Load:
    """`clients` threads sending GET back to back through the gateway until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.served = 0
        self.failed: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                try:
                    r = c.get(self.url)
                    ok, why = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                with self._lock:
                    if ok:
                        self.served += 1
                    else:
                        self.failed.append((time.monotonic(), why))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with running_platform("oslfail-", "--gateways", "1") as p:
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{p.api_port}",
            headers={"authorization": f"Bearer {p.token}"},
            timeout=30,
        )
        made = api.post("/v1/nodes/n2/token").json()
        n2_dir = p.work / "n2"
        n2_dir.mkdir()
        (n2_dir / "images").symlink_to(p.data_dir / "images")  # images across nodes: not yet
        agent = subprocess.Popen(
            [sys.executable, "-m", "tests.node_agent", str(api.base_url), "n2", str(n2_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OSLESS_TOKEN": made["token"]},
            cwd=ROOT,
        )
        try:
            _wait("node n2", lambda: any(n["name"] == "n2" for n in api.get("/v1/nodes").json()["items"]), 30)
            p.osless("deploy", str(HOLDER), "--detach")
            p.osless("scale", "holder", "--min", str(args.instances))
            spread = _wait(
                "the instances on both nodes",
                lambda: (
                    len(r := _ready(api, "holder")) == args.instances
                    and len({i["node"] for i in r}) == 2
                    and r
                ),
                120,
            )
            on_n2 = sum(1 for i in spread if i["node"] == "n2")
            with Load(f"{p.gateway}/holder/", args.clients) as load:
                time.sleep(2)
                before = load.served
                killed = time.monotonic()
                agent.send_signal(signal.SIGKILL)
                _wait(
                    "the instances replaced",
                    lambda: (
                        len(r := _ready(api, "holder")) == args.instances
                        and all(i["node"] != "n2" for i in r)
                    ),
                    60,
                )
                replaced_s = time.monotonic() - killed
                time.sleep(2)
            failed = list(load.failed)
        finally:
            agent.kill()
            agent.wait()
    result = {
        "instances": args.instances,
        "on_killed_node": on_n2,
        "clients": args.clients,
        "replaced_s": round(replaced_s, 2),
        "target_s": 10,
        "met": replaced_s <= 10,
        "served": load.served,
        "served_before_kill": before,
        "failed": len(failed),
        "failed_after_kill_s": sorted({round(t - killed, 1) for t, _ in failed})[:20],
        "failures": sorted({why for _, why in failed}),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
