"""Code-only redeploy of examples/hello, from the CLI call to the new release answering.

Side by side, the baseline: the same app started the way a bare server restart would do it, a fresh
interpreter running uvicorn on the app until it answers. Prints a JSON object as its last line.

    .venv/bin/python benchmarks/deploy.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _platform import BIN, running_platform

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.5


def wait_for_text(url: str, text: str, timeout: float = 60.0, **kw: object) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(**kw) as client:  # type: ignore[arg-type]
        while time.monotonic() < deadline:
            try:
                if text in client.get(url, timeout=2).text:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    raise SystemExit(f"{url} never answered with {text!r}")


def set_marker(app_dir: Path, marker: str) -> None:
    path = app_dir / "app.py"
    src = path.read_text()
    start = src.index('PlainTextResponse("') + len('PlainTextResponse("')
    end = src.index('")', start)
    path.write_text(src[:start] + marker + src[end:])


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 3), "min": round(xs[0], 3), "max": round(xs[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with running_platform("osless-bench-deploy-") as platform:
        work = platform.work
        app_dir = work / "hello"
        shutil.copytree(ROOT / "examples" / "hello", app_dir, ignore=shutil.ignore_patterns("__pycache__"))
        url = f"{platform.gateway}/hello/"

        def deploy(marker: str) -> float:
            set_marker(app_dir, marker)
            t0 = time.perf_counter()
            subprocess.run(
                [str(BIN / "osless"), "deploy", str(app_dir)],
                env=platform.env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for_text(url, marker)
            return time.perf_counter() - t0

        deploy("warm-up: dependencies resolved and installed once")
        osless_runs = [deploy(f"release {i}") for i in range(args.runs)]

        # Baseline: a fresh interpreter serving the same image's code and dependency layers with uvicorn.
        built = platform.data_dir / "builder" / "images"  # the builder's store: the API keeps archives only
        manifests = sorted((built / "manifests").glob("*.json"), key=lambda p: p.stat().st_mtime)
        manifest = json.loads(manifests[-1].read_text())
        layers = built / "layers"
        code, deps = layers / manifest["layers"]["code"], layers / manifest["layers"]["deps"]
        sock = work / "baseline.sock"
        script = (
            f"import sys; sys.path[:0] = [{str(code)!r}, {str(deps)!r}]\n"
            "import uvicorn, app\n"
            f"uvicorn.run(app.web(), uds={str(sock)!r}, log_level='warning')\n"
        )
        base_runs = []
        for _ in range(args.runs):
            sock.unlink(missing_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-s", "-c", script])
            wait_for_text("http://baseline/", "release", transport=httpx.HTTPTransport(uds=str(sock)))
            base_runs.append(time.perf_counter() - t0)
            proc.send_signal(signal.SIGTERM)
            proc.wait()

    o, b = summary(osless_runs), summary(base_runs)
    result = {
        "benchmark": "deploy",
        "what": "code-only redeploy of examples/hello, CLI call to the new release answering (seconds)",
        "runs": args.runs,
        "osless_redeploy_s": o,
        "baseline_bare_restart_s": b,
        "ratio_median": round(o["median"] / b["median"], 2),
        "target_median_s": TARGET_S,
        "meets_target": o["median"] < TARGET_S,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
