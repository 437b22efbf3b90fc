"""What observing a request costs the instance and the node agent, measured in one process.

The instance's part: `applog.logged` around a do-nothing ASGI app (a request id, the id in the
answer's headers, the request's `REQUEST_ID`, its access line written in a batch to stderr, here
/dev/null) against the same app called bare. The node agent's part: one access line as the
instance writes it, from the line read off the instance's stderr to the record in the instance's
log file (`LogWriter.write_instance`, as the spawn path calls it, on a running loop), for a marked
line and a plain one. CPU time (`time.process_time`) per call, the median of `--repeats` timings of
`--calls` calls each. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/request_cost.py [--calls 50000] [--repeats 7]

2026-12-06, this 2-core VM shared with other test runs (load 7 to 12), the code before and after the
node stopped parsing an instance's marked lines, timed the same way in the same hour: the node agent's
part per access line 11.1-13.3 us (json.loads, `extra_fields`, json.dumps of the record: what issue
14's logging had added to every request) -> 2.1-2.5 us (the line spliced with the node's fields and
appended as it came, its fields checked where the log is read); a plain line of the app's 4.9 ->
1.4 us (its record written out by hand, not through a dict and json.dumps). The instance's part:
4.9 -> 3.8-4.2 us per request (an access line without its text for people, made where it is read;
the request id header added without copying the app's headers twice), against 0.4 us for the bare
app call: the rest is the id (0.35 us), the `send` wrapper (0.6 us to make, about as much per
answer's start), the access line's JSON (1.0 us) and its batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osless.logs import LogWriter
from osless.runtime import applog


def per_call_us(run: Callable[[int], None], calls: int, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.process_time()
        run(calls)
        timings.append((time.process_time() - start) / calls * 1e6)
    return round(statistics.median(timings), 3)


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


async def _sent(message: Any) -> None:
    pass


def instance(calls: int, repeats: int) -> dict[str, float]:
    scope = {"type": "http", "method": "GET", "path": "/hello/", "headers": []}

    async def bare(n: int) -> None:
        for _ in range(n):
            await _ok(scope, None, _sent)

    async def logged(n: int) -> None:
        for _ in range(n):
            rid = applog.new_request_id()
            await applog.logged(scope, None, _sent, _ok, rid, "GET", "/hello/")

    with asyncio.Runner() as runner:
        base = per_call_us(lambda n: runner.run(bare(n)), calls, repeats)
        with_log = per_call_us(lambda n: runner.run(logged(n)), calls, repeats)
        runner.run(asyncio.sleep(0.05))  # the last batch's timer
    return {"bare_us": base, "logged_us": with_log, "added_us": round(with_log - base, 3)}


def node(calls: int, repeats: int) -> dict[str, float]:
    line = applog._access_line("GET", "/hello/", 200, 0.412, False, applog.new_request_id()).decode()
    line = line.rstrip("\n")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("access_line_us", line), ("plain_line_us", "hello from the app")):
            log = LogWriter(Path(tmp) / f"{name}.log", source="i-0123456789", cap_bytes=64 << 20)

            async def emit(n: int, log: LogWriter = log, text: str = text) -> None:
                for _ in range(n):
                    log.write_instance(text, "stderr")

            with asyncio.Runner() as runner:
                out[name] = per_call_us(lambda n, emit=emit: runner.run(emit(n)), calls, repeats)
            log.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    # The instance's access lines go to fd 2: here, nowhere.
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        inst = instance(args.calls, args.repeats)
    finally:
        os.dup2(saved, 2)
    result = {
        "benchmark": "request_cost",
        "instance": inst,
        "node_agent": node(args.calls, args.repeats),
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
