"""A warm request through the osless gateway versus the same app served directly by uvicorn.

examples/hello's web route, side by side in one run on the same cores: uvicorn (uvloop, httptools)
serving the app's own image layers, then `osless up` with one instance of it; load from `wrk`
(Debian's package: `apt-get install -y wrk`) on loopback. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/throughput.py [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _platform import free_port, running_platform

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO, TARGET_ADDED_P50_MS = 0.6, 0.5


def wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return round(float(m.group(1)) * scale, 3)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "requests_per_s": float(rps.group(1)) if rps else 0.0,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark needs wrk: apt-get install -y wrk")
    direct_port = free_port()
    direct = None
    with running_platform("osless-bench-tp-") as platform:
        try:
            platform.osless("deploy", str(ROOT / "examples" / "hello"))
            platform.osless("scale", "hello", "--min", "1", "--max", "1")
            stored = (platform.data_dir / "images" / "manifests").glob("*.json")
            manifest = next(json.loads(p.read_text()) for p in stored)
            layers = platform.data_dir / "images" / "layers"
            script = (
                f"import sys; sys.path[:0] = [{str(layers / manifest['layers']['code'])!r}, "
                f"{str(layers / manifest['layers']['deps'])!r}]\n"
                "import uvicorn, app\n"
                f"uvicorn.run(app.web(), host='127.0.0.1', port={direct_port}, log_level='warning', "
                "loop='uvloop', http='httptools', access_log=False)\n"
            )
            direct = subprocess.Popen([sys.executable, "-s", "-c", script])
            wait_ok(f"http://127.0.0.1:{direct_port}/")
            wait_ok(f"{platform.gateway}/hello/")
            wrk(f"http://127.0.0.1:{direct_port}/", 1, args.connections)  # warm both up
            wrk(f"{platform.gateway}/hello/", 1, args.connections)
            base = wrk(f"http://127.0.0.1:{direct_port}/", args.seconds, args.connections)
            osless = wrk(f"{platform.gateway}/hello/", args.seconds, args.connections)
        finally:
            if direct is not None:
                direct.send_signal(signal.SIGTERM)
                direct.wait(30)
    ratio = osless["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else 0.0
    added = osless["p50_ms"] - base["p50_ms"]
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "what": "examples/hello web route: uvicorn directly vs through the gateway, 1 instance",
                "load": {
                    "tool": "wrk",
                    "threads": 2,
                    "connections": args.connections,
                    "seconds": args.seconds,
                },
                "direct_uvicorn": base,
                "through_osless": osless,
                "ratio_requests_per_s": round(ratio, 3),
                "added_p50_ms": round(added, 3),
                "targets": {"ratio": TARGET_RATIO, "added_p50_ms": TARGET_ADDED_P50_MS},
                "meets_ratio": ratio >= TARGET_RATIO,
                "meets_added_p50": added <= TARGET_ADDED_P50_MS,
            }
        )
    )


if __name__ == "__main__":
    main()
