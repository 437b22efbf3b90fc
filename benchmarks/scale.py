"""From zero to 200 concurrent clients and back: how fast an idle app absorbs a crowd.

examples/hello at zero instances (min 0, a short idle window); 200 clients start at once, each
sending requests back to back for a few seconds. Reported: the time until every client had its
first answer, the instances the autoscaler started, errors (there must be none), and the time back
to zero once the load stops, then single requests each sent to the app at zero (the activator's
wake: fork, not boot). Side by side, the same crowd against the app already warm, with as
many instances running. A failed request in either crowd (an error answer or a broken connection)
means the target is not met. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/scale.py [--clients 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _platform import running_platform

ROOT = Path(__file__).resolve().parent.parent


async def crowd(port: int, path: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` at once, each on its own kept-alive connection, back to back until `seconds` pass.

    Raw sockets rather than an HTTP library: the load generator must not be what is measured.
    """
    first: list[float] = []
    errors: dict[str, int] = {}
    served = 0
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    start = time.perf_counter()

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return status

    async def one() -> None:
        nonlocal served
        got_first = False
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() - start < seconds or not got_first:
                try:
                    status = await exchange(reader, writer)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    writer.close()
                    if time.perf_counter() - start > 60:
                        return
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    continue
                served += 1
                if not got_first:
                    got_first = True
                    first.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return {
        "all_served_s": round(max(first), 3) if len(first) == clients else None,
        "first_answer_p50_s": round(statistics.median(first), 3) if first else None,
        "requests": served,
        "errors": errors,
    }


def one_request(port: int, path: str) -> float:
    """Seconds for one GET on a fresh connection, connect to last byte (a raw socket: no client
    library's own start-up in the figure)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    elapsed = time.perf_counter() - t0
    if not data.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"GET {path}: {data[:200]!r}")
    return elapsed


def api(port: int, token: str, path: str) -> Any:
    return httpx.get(
        f"http://127.0.0.1:{port}{path}", headers={"authorization": f"Bearer {token}"}, timeout=10
    ).json()


def ready(port: int, token: str) -> int:
    items = api(port, token, "/v1/instances?app=hello")["items"]
    return sum(1 for i in items if i["status"]["phase"] == "ready")


def wait(predicate: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit("timed out")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=float, default=3.0, help="the app's idle window before zero")
    parser.add_argument("--lone", type=int, default=5, help="single requests timed from zero")
    args = parser.parse_args()
    with running_platform("osless-bench-scale-") as platform:
        api_port, http_port, token, osless = (
            platform.api_port,
            platform.http_port,
            platform.token,
            platform.osless,
        )
        osless("deploy", str(ROOT / "examples" / "hello"))
        osless("scale", "hello", "--min", "0", "--max", "20", "--target", "10", "--idle", str(args.idle))
        wait(
            lambda: (
                ready(api_port, token) == 0 and not api(api_port, token, "/v1/instances?app=hello")["items"]
            ),
            60,
        )

        peak = 0
        done = threading.Event()

        def watch_peak() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, ready(api_port, token))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch_peak)
        watcher.start()
        try:
            cold = asyncio.run(crowd(http_port, "/hello/", args.clients, args.seconds))
        finally:
            done.set()
            watcher.join()
        back_to_zero = wait(lambda: not api(api_port, token, "/v1/instances?app=hello")["items"], 180)
        reason = api(api_port, token, "/v1/apps/hello")["status"]["scale_reason"]

        # One request alone, each time after the app went back to zero: the activator's wake.
        lone: list[float] = []
        for _ in range(args.lone):
            wait(lambda: not api(api_port, token, "/v1/instances?app=hello")["items"], 180)
            lone.append(one_request(http_port, "/hello/"))
        lone_warm = one_request(http_port, "/hello/")  # the same, now warm

        # Baseline: the same crowd with the instances already running.
        osless("scale", "hello", "--min", str(max(peak, 1)), "--max", "20")
        wait(lambda: ready(api_port, token) >= max(peak, 1), 120)
        warm = asyncio.run(crowd(http_port, "/hello/", args.clients, args.seconds))
    # Any request that failed, in either crowd, means the target is not met: the warm baseline
    # erring would make the comparison meaningless too.
    errors = sum(cold["errors"].values()) + sum(warm["errors"].values())
    served_all = cold["all_served_s"] is not None and warm["all_served_s"] is not None
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "what": f"examples/hello from zero instances to {args.clients} concurrent clients and back",
                "clients": args.clients,
                "seconds_of_load": args.seconds,
                "from_zero": cold,
                "instances_started": peak,
                "back_to_zero_s_after_load": round(back_to_zero, 2),
                "idle_window_s": args.idle,
                "last_reason": reason,
                "lone_request_from_zero_ms": {
                    "n": len(lone),
                    "p50": round(statistics.median(lone) * 1000, 1) if lone else None,
                    "max": round(max(lone) * 1000, 1) if lone else None,
                    "same_request_warm": round(lone_warm * 1000, 1),
                },
                "baseline_already_warm": warm,
                "errors": errors,
                "meets_no_errors": errors == 0 and served_all,
                "target_met": errors == 0 and served_all,
            }
        )
    )


if __name__ == "__main__":
    main()
