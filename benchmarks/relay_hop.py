"""What the relay hop costs: a request through a gateway to an instance on its own node (unix
socket) against one to an instance on another node (TCP to that node's relay, then its socket).

Two nodes on this machine: `osless up` and an `osless node join` (one gateway process each), and an
app with one instance on each. One client keeps one connection to the first node's gateway and
sends requests one at a time (no queueing in the figures); each answer says which instance served
it, so the same run, the same connection and the same moments give both samples. The gateway keeps
its connections to both instances (and so through the relay) alive, as in steady traffic. Prints
one JSON object as its last line: the medians and p90s of each, and the median added by the hop.

    .venv/bin/python benchmarks/relay_hop.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
from _platform import BIN, free_port, running_platform

APP = Path(__file__).resolve().parent / "apps" / "whoami"


def get(sock: socket.socket) -> bytes:
    """One GET / on a kept-alive connection; the answer's body (content-length framed)."""
    sock.sendall(b"GET /whoami/ HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return body


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with running_platform("osless-relay-hop-", "--gateways", "1") as p:
        api = f"http://127.0.0.1:{p.api_port}"
        headers = {"authorization": f"Bearer {p.token}"}
        made = httpx.post(
            f"{api}/v1/tokens", json={"name": "node:second", "role": "node"}, headers=headers
        ).json()
        second = p.work / "second"
        second.mkdir()
        join = ["node", "join", "--api", api, "--name", "second", "--data-dir", str(second)]
        log = p.work / "second.log"
        with log.open("wb") as out:
            node = subprocess.Popen(
                [str(BIN / "osless"), *join, "--http-port", str(free_port()), "--gateways", "1"],
                env={**os.environ, "OSLESS_NODE_TOKEN": made["token"]},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while not any(
                n["name"] == "second" and n.get("relay")
                for n in httpx.get(f"{api}/v1/nodes", headers=headers).json()["items"]
            ):
                if time.monotonic() > deadline or node.poll() is not None:
                    raise SystemExit(f"the second node did not join: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            p.osless("deploy", str(APP))
            p.osless("scale", "whoami", "--min", "2", "--max", "2")
            deadline = time.monotonic() + 120
            on: dict[str, str] = {}
            while len(on) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the app never had an instance ready on each node: {log.read_text()[-2000:]}"
                    )
                items = httpx.get(f"{api}/v1/instances", params={"app": "whoami"}, headers=headers).json()
                on = {i["id"]: i["node"] for i in items["items"] if i["status"]["phase"] == "ready"}
                on = on if len(set(on.values())) == 2 else {}
                time.sleep(0.2)
            remote = next(i for i, n in on.items() if n == "second")
            samples: dict[str, list[float]] = {"local": [], "relayed": []}
            with socket.create_connection(("127.0.0.1", p.http_port)) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                seen: set[bytes] = set()
                while len(seen) < 2:  # warm: both routes known, both pools holding a connection
                    seen.add(get(sock))
                for _ in range(args.requests):
                    started = time.perf_counter()
                    who = get(sock).decode()
                    took = time.perf_counter() - started
                    samples["relayed" if who == remote else "local"].append(took * 1000)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(30)
    result: dict[str, object] = {"requests": args.requests}
    for kind, xs in samples.items():
        result[kind] = {
            "n": len(xs),
            "p50_ms": round(statistics.median(xs), 3),
            "p90_ms": round(percentile(xs, 90), 3),
        }
    result["added_p50_ms"] = round(
        statistics.median(samples["relayed"]) - statistics.median(samples["local"]), 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
