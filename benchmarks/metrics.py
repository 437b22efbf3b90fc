"""What metrics and traces cost a request: the same warm request through two `osless up` in the same
run, one as it runs by default (the gateway's request counting for `GET /metrics`, `osless top` and
`osless usage` on; traces sampled at the default `--trace-sample`, 0.01) and one with both off
(`--no-gateway-metrics`, and `OSLESS_TRACES=off` in its environment: no spans). One gateway
process and one instance of examples/hello each; load from `wrk`
(`apt-get install -y wrk`), the two taking turns round after round so that a noisy neighbour hits
both alike; ratio and added p50 worked out round by round (paired), their medians reported, with
the CPU the gateway process spent per answer on each side (from /proc). Target: the counting costs
at most 5% of throughput and 0.05 ms of p50. Prints one JSON object as its last line.

    .venv/bin/python benchmarks/metrics.py [--seconds 3] [--rounds 8] [--connections 32]

Each round has three passes, each side in turn: saturated (`--connections` closed loops, as fast as
answers come: `ratio`), one connection (a lone request's p50: `one_connection`), and half load (the
same connections, each waiting between requests by wrk's `delay()`, so that together they offer
about half of what the off side answered at saturation that round, `off_share_of_saturated` saying
how near; one wait for both sides: `half_load`). The p50 target is judged on the last two: `met` is
ratio >= 0.95, no errors, and each of their paired added p50s <= 0.05 ms. The two sides swap places
every round (off first in even rounds, on first in odd ones), and each figure is the median over
pairs of rounds of the pair's mean (`balanced`; geometric for ratios): where one side always went
first, two platforms alike came out 0.927 (7 rounds), so `--rounds` is even. The saturated added p50
is kept in the output but is not a latency figure: with every core busy a closed loop's p50 is its
queue, connections / throughput, so it is the throughput ratio again (at a p50 of 2.4 ms, each 1%
more CPU per answer is 0.024 ms more) and says nothing of what a request waits for with room left.

Each round also gives the CPU per answer of the gateway, the instance and `osless up` (node agent,
API) apart, at saturation. `trace_ns_per_request` is what traces cost, timed in this process (CPU
of the loop's thread): the instance's own ASGI entry with a tracer provider and a span pipe,
unsampled and sampled, against tracing off; and the gateway's traceparent for each request, which
both sides make (neither flag turns it off), so it is in none of the paired figures.

On a machine shared with other runs the paired wrk figures move by more than the counting costs;
`count_ns_per_request` is the call itself, timed in this process (`Metrics.end` on an exchange with a
real httptools parser that read a real answer, the rest of the exchange plain attributes; median of
7 timings of 100,000 calls), and `gateway_cpu_us_per_request` what a gateway spends per answer in all.

2026-12-06, later, metrics and traces together (traces off by `OSLESS_TRACES=off`), after the
instance's request path was made cheaper (request ids without a system call, access lines written by
hand, no span machinery for a trace not sampled), load 2 to 3.3: ratio 0.924 (rounds 0.71 to 1.33:
noise both ways), added p50 0.58 ms; all the platform's processes spent 169.9 us per answer on
against 157.5 us off (+7.9%), the gateway 61.9 against 60.6 us. Not met on this shared machine: the
CPU figure is the steadier one, and 5% of it is 8 us.

2026-12-06, evening, after: trace ids made 128 at a time (a getrandom system call per request
before), spans written 0.2 s after the first of them ended, up to PIPE_BUF of them a write (a
write in the instance and a wakeup of the node per span before), a span's parent built from the
header already checked, and the gateway's writes to an instance held until the client's read is
parsed. Old code (0620ff1) and new in turn, same benchmark, medians of 7 rounds:
- old, load 8: ratio 0.72, added p50 1.71 ms (one connection: +0.013 ms); CPU per answer on vs
  off: platform 176.7 vs 148.6 us (+28.1), gateway +2.9, instance +13.1, osless up +4.0;
- new, load 4 to 6: ratio 0.99 (rounds 0.82 to 1.52), added p50 0.0 ms (one connection: -0.013);
  platform 132.7 vs 124.8 us (+7.9, +6.3%), gateway +1.9, instance +6.5, osless up 0.0;
- new, load 10 to 13: ratio 0.76, added p50 2.66 ms (one connection: -0.011); platform +30.5 us,
  gateway -0.8, instance +17.8, osless up +3.8.
Two platforms alike (both on; load 11 to 16) came out 3 us apart on the instance and 7 on osless
up: the paired CPU figures move by that much on their own here. What the code costs, timed in one
process (`trace_ns_per_request`, `count_ns_per_request`, load 4 to 5): an instance's request not
sampled costs what it does with tracing off, within 0.6 us (a few string operations); a sampled
one 58-60 us more (the SDK's span, its JSON line, its share of a write); one in 20 sampled, the
default, 4.3-4.8 us a request: a sampled request among unsampled ones costs ~90 us, not 60, the
SDK's code and data cold by then (and colder on a loaded machine). The gateway's traceparent
0.9-1.1 us (1.9 with a getrandom each), its count 0.6 us. So what remains is the sampled requests,
not the unsampled path: at the default 5%, 4-5 us of the instance's ~70 per answer, about what the
paired figure shows at load 4 to 6; `--trace-sample 0.01` would make it ~1 us. The 5% CPU target
is missed by that much, more under load.
py-spy of the instance under wrk (on, new code): tracing's frames 2.3% of its samples; of the
gateway: `_head`'s trace context, the sampler, the traceparent and `Metrics.end` 1.1%.

The rest of what the node does for metrics is off the request path: a gateway sends its figures
once a second, the node samples them and its cgroups once a second, and a scrape reads what is kept.

2026-12-06, this 2-core VM shared with other test runs (load 9 to 13): two runs, 7 and 9 rounds.
The paired wrk rounds moved 0.28x to 3.1x between the two sides (medians 1.09 and 0.91, added p50
+5.9 and -1.0 ms): noise, both ways, far past what is measured. The gateway's CPU per answer, on vs
off: 63.0 vs 60.9 us, then 60.8 vs 63.5 us: the counting is below what this machine can show. The
call itself: 1.4 us (a no-op lambda call 22 ns then) to 2.0 us (under more load): 2 to 3% of the
gateway's ~60 us per answer here, and 0.002 ms of a request's time: within both targets (5% of
throughput, 0.05 ms of p50), as far as CPU goes; a quiet machine is needed to see it in wrk.

2026-12-06, evening, after the node stopped parsing the instances' access lines (`osless.logs`), the
old and the new code back to back, load 10 to 12: all the platform's processes spent 209.7 us per
answer on and 165.7 off before, 194.8 on and 164.7 off after (gateway 70.2/55.2 before, 75.1/65.4
after); ratio 0.777 and 0.780, added p50 2.73 and 2.42 ms. Logs are on in both columns, so their
saving (about 10 us per answer in the node, `benchmarks/throughput.py`) shows in neither ratio; on
this machine it is within the noise of the totals as well.

2026-12-06, 19:11-19:56, the machine quiet (load 0.4 to 2.7), traces at the new default share (1%,
the first of each second besides), three runs: ratio 1.01, 0.963 and 0.94 (median 0.963: within 5%);
all the platform's processes per answer +0.4 of 120.8, +3.4 of 112.0 and +4.1 of 82.9 us (0.3%, 3.0%,
4.9%), nearly all of it the instance (+4.8, +2.9, +4.4 us; the gateway -4.7, -0.2, +0.4); a lone
request's p50 +0.031, +0.001 and +0.009 ms (median 0.009: within 0.05); at 32 connections the paired
p50 moved -0.11, +0.16 and +0.11 ms (median 0.11, rounds -1.18 to +2.72): `met` false in the last
two runs on that figure. With 32 connections on one gateway and one instance every core is busy, so
the p50 there is queueing and moves with the CPU per answer (2.4 ms x 4% = 0.1 ms): that reading of
the 0.05 ms target asks the counting to cost under 2% of the CPU.

2026-12-06, 22:37-22:45, three runs with the half-load pass (load 1.4 to 2.1): ratio 0.992, 0.911,
0.916 (rounds 0.81 to 1.21); added p50 on one connection -0.009, +0.012, +0.003 ms; at half load
-0.080, +0.056, +0.002 ms; at saturation 0.00, 0.26, 0.22 ms; all the platform's CPU per answer
-0.3, +8.8, +8.6 us added. `met` in the first run only: the latency targets are met (medians
+0.003 and +0.002 ms), the throughput ratio's median (0.916) is not, against 0.963 the session before.

2026-12-07, quiet (load 1.2 to 2.5). One run as it was (off always first): 0.89, the platform's CPU
per answer +9.3 us. Then an A/A run, two platforms as they run by default, one always first: 0.927
(rounds 0.85 to 1.29): a bias of the order itself, as large as what is measured. With the sides
swapping places each round, the same A/A: 1.001. A probe of 8 alternating rounds (on against off)
showed the second run of a round faster by ~5% whichever side it was, the CPU per answer following
(whole machine's per answer: the side with the lower figure answered more; idle ~9% on both). Hence
the balanced pairs of rounds (module docstring). Runs since, each 7 or 8 rounds: ratio 0.939,
0.911, 0.932 (medians over alternating rounds), then over balanced pairs 0.988, 0.967, 0.996 and,
after the access lines got a pipe of their own (both sides), 1.012: `met` in the last four, median
0.992. Added p50 on one connection +0.007, +0.016, +0.005, 0.000 ms; at half load +0.024, -0.035,
+0.032, -0.050 ms; the platform's CPU per answer +3.5, +5.5, +4.8, +6.4 us of 81 to 108 (3 to 6%;
in-process, traces cost an instance 2.2 us a request at the 1% default and the gateway's count
0.6 us). Two more on the code as committed (load 1.7 to 3): ratio 1.002 and 1.001, one connection
+0.005 and +0.004 ms, half load +0.157 ms (7 of 8 rounds +0.10 to +0.26: the on side answered 8.2k/s
against 8.7k/s offered, `met` false) and +0.019 ms; CPU +0.3 and +2.0 us. Over the six balanced runs:
ratio median 0.999 (0.967 to 1.012), one connection +0.005 ms, half load +0.022 ms; met in five.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import timeit
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httptools
from _platform import ROOT, running_platform
from throughput import balanced, descendants, instance_pids, median_of, wait_ok, wait_ready, wrk
from throughput import cpu_s as cpu_of

TARGET_RATIO, TARGET_ADDED_P50_MS = 0.95, 0.05
HALF = 0.5  # the half-load pass's offered rate, of what the off side answered at saturation


@contextlib.contextmanager
def paced(mean_ms: float) -> Iterator[Path]:
    """A wrk script whose connections each wait `mean_ms` on average after each answer. wrk's
    `delay()` is whole milliseconds: a mix of the two nearest gives the mean (and spreads the
    connections' sends over time, where one fixed delay would keep them in step)."""
    low = int(mean_ms)
    script = (
        f"local low, frac = {low}, {mean_ms - low:.4f}\n"
        "function delay()\n"
        "  if math.random() < frac then return low + 1 end\n"
        "  return low\n"
        "end\n"
    )
    with tempfile.NamedTemporaryFile("w", prefix="osless-paced-", suffix=".lua") as f:
        f.write(script)
        f.flush()
        yield Path(f.name)


def added(pairs: list[tuple[dict[str, float], dict[str, float]]]) -> list[float]:
    """Each round's p50 on minus off (ms)."""
    return [round(on["p50_ms"] - off["p50_ms"], 3) for off, on in pairs]


def count_ns_per_request() -> float:
    """What `Metrics.end` costs a request, in nanoseconds: the hot path's one call."""
    import uvloop

    from osless.gateway.metrics import Metrics

    parser = httptools.HttpResponseParser(SimpleNamespace())
    parser.feed_data(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    loop = uvloop.new_event_loop()  # the gateway's: `time()` is libuv's clock of this turn, no system call
    try:
        control = object()
        exchange = SimpleNamespace(
            conn=SimpleNamespace(responded=True, loop=loop),
            up=SimpleNamespace(started=True, _parser=parser, error=None, pool=object()),
            backend=SimpleNamespace(app="hello", control=control),
            head=b"GET / HTTP/1.1\r\n\r\n",
            ends=loop.time() + 60.0,
            timeouts=SimpleNamespace(whole=60.0),
        )
        metrics = Metrics()
        n = 100_000
        now = loop.time() + 0.003
        timings = timeit.repeat(lambda: metrics.end(exchange, now), number=n, repeat=7)  # type: ignore[arg-type]
        assert sum(metrics.series[("hello", "web")].codes) == 7 * n
        return round(statistics.median(timings) / n * 1e9, 1)
    finally:
        loop.close()


def trace_ns_per_request(n: int = 20_000) -> dict[str, float]:
    """What traces cost an instance per request, in nanoseconds of CPU, timed in this process: the
    instance's own ASGI entry (`runtime.instance.Instance`, its access line and all) serving a bare
    ASGI answer, with a tracer provider and a span pipe as an instance has them (`tracing.start`),
    for a request not sampled, for one sampled (its span made, queued and written to the pipe,
    which a thread drains as the node would) and for one in 20 sampled (the default ratio), against
    the same with tracing off; and what the gateway spends on each request's traceparent
    (`sdk.traceparent`: sampled or not, made anew). Medians of 5 timings of `n` requests each."""
    import asyncio
    import threading
    import time

    import uvloop

    from osless.gateway.proxy import DEFAULT_TRACE_SAMPLE
    from osless.runtime import tracing
    from osless.runtime.instance import Instance
    from osless.sdk import traceparent
    from osless.sdk.app import App

    read, write = os.pipe()

    def drain() -> None:  # as the node does
        while os.read(read, 1 << 16):
            pass

    threading.Thread(target=drain, daemon=True).start()
    os.environ[tracing.SPANS_FD_ENV] = str(write)
    tracing.preload("hello")
    tracing.start("hello", "bench-1")
    del os.environ[tracing.SPANS_FD_ENV]  # not for the platforms this process starts
    tracer = tracing._tracer

    async def web(scope: dict[str, object], receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def sent(message: object) -> None:
        pass

    async def received() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    instance = Instance(App("hello"), web)

    def scope(sampled: bool) -> dict[str, Any]:
        headers = [(b"host", b"x"), (b"traceparent", traceparent.new(sampled))]
        return {"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""}

    async def timed(every: int, on: bool) -> float:
        """Each `every`th request sampled (0: none)."""
        tracing._tracer = tracer if on else None
        scopes = [scope(every > 0 and i % every == 0) for i in range(n)]
        started = time.thread_time()  # the loop's thread: not the one draining the pipe
        for i, sc in enumerate(scopes):
            await instance(sc, received, sent)
            if i % 1000 == 999:
                tracing.flush()  # as its timer would: no span dropped from a queue that outgrew its cap
        await asyncio.sleep(tracing.FLUSH_S + 0.05)  # the last spans written (no CPU in the wait)
        return (time.thread_time() - started) / n * 1e9

    async def run() -> dict[str, float]:
        times: dict[str, list[float]] = {"off": [], "unsampled": [], "sampled": [], "mixed": []}
        for _ in range(5):
            times["off"].append(await timed(0, False))
            times["unsampled"].append(await timed(0, True))
            times["sampled"].append(await timed(1, True))
            # As the default share has it (one in 100): the SDK's code and data cold each time.
            times["mixed"].append(await timed(round(1 / DEFAULT_TRACE_SAMPLE), True))
        return {k: statistics.median(v) for k, v in times.items()}

    null = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(null, 2)  # the access lines
    try:
        got = uvloop.run(run())
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    sampler = traceparent.Sampler(DEFAULT_TRACE_SAMPLE)
    gateway = min(timeit.repeat(lambda: traceparent.new(sampler()), number=100_000, repeat=5)) / 100_000 * 1e9
    return {
        "instance_unsampled": round(got["unsampled"] - got["off"]),
        "instance_sampled": round(got["sampled"] - got["off"]),
        # At the default share (the first of each second is nothing at thousands a second).
        "instance_per_request": round(got["mixed"] - got["off"]),
        "gateway_traceparent": round(gateway),
        "instance_request_off": round(got["off"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=3, help="of each wrk run")
    parser.add_argument("--rounds", type=int, default=8, help="even: each side goes first in half")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark needs wrk: apt-get install -y wrk")
    if args.rounds < 2 or args.rounds % 2:
        raise SystemExit(f"--rounds must be even (got {args.rounds}): each side goes first in half of them")
    count_ns = count_ns_per_request()
    trace_ns = trace_ns_per_request()
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    lone: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    half: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    delays: list[float] = []
    shares: list[float] = []  # each round's off side at half load, of its answers at saturation
    rest_ms: float | None = None
    load_before = os.getloadavg()  # on a shared machine, what else ran: every figure depends on it
    with contextlib.ExitStack() as stack:
        platforms = {
            "off": stack.enter_context(
                running_platform(
                    "osless-bench-metrics-off-",
                    "--gateways",
                    "1",
                    "--no-gateway-metrics",
                    env={"OSLESS_TRACES": "off"},
                )
            ),
            "on": stack.enter_context(running_platform("osless-bench-metrics-on-", "--gateways", "1")),
        }
        groups: dict[str, dict[str, list[int]]] = {}
        for name, platform in platforms.items():
            platform.osless("deploy", str(ROOT / "examples" / "hello"))
            platform.osless("scale", "hello", "--min", "1", "--max", "1")
            wait_ready(platform, 1)
            wait_ok(f"{platform.gateway}/hello/")
            wrk(f"{platform.gateway}/hello/", 1, args.connections)  # warm up
            groups[name] = {
                "gateway": [
                    pid
                    for pid in descendants(platform.proc.pid)
                    if b"osless.gateway" in Path(f"/proc/{pid}/cmdline").read_bytes()
                ],
                "instance": instance_pids(platform),
                # `osless up` itself: the node agent (which reads the spans), the API, the controllers.
                "up": [platform.proc.pid],
                # The gateway, the instance, the node agent and the API: all the platform spent.
                "platform": [platform.proc.pid, *descendants(platform.proc.pid)],
            }
        for round_no in range(args.rounds):
            # Each side goes first in every other round, and the figures are those of two rounds
            # together (`balanced`): which run of a round goes first moves it by several percent
            # (the docstring), more than what is measured here.
            order = list(platforms.items())[:: -1 if round_no % 2 else 1]
            for name, platform in order:
                before = {group: cpu_of(pids) for group, pids in groups[name].items()}
                result = wrk(f"{platform.gateway}/hello/", args.seconds, args.connections)
                for group, pids in groups[name].items():
                    spent = cpu_of(pids) - before[group]
                    result[f"{group}_cpu_us_per_request"] = round(spent / max(result["requests"], 1) * 1e6, 1)
                runs[name].append(result)
            for name, platform in order:  # a lone request: the p50 with no queue in it
                lone[name].append(wrk(f"{platform.gateway}/hello/", args.seconds, 1))
            # Half load: the same connections, each waiting between requests, so that together they
            # offer about HALF of what the off side answered at saturation this round. A connection's
            # cycle is its wait plus the rest (the request's time, wrk's timer): the rest as the last
            # round's off side had it, or in the first round a lone request's p50. One wait for
            # both sides: paired.
            if rest_ms is None:
                lone_ms = lone["off"][-1]["p50_ms"]
                rest_ms = 0.0 if math.isnan(lone_ms) else lone_ms
            rate = HALF * runs["off"][-1]["requests_per_s"]
            wait = round(max(args.connections / max(rate, 1.0) * 1000 - rest_ms, 0.0), 2)
            delays.append(wait)
            with paced(wait) as script:
                for name, platform in order:
                    half[name].append(
                        wrk(f"{platform.gateway}/hello/", args.seconds, args.connections, script)
                    )
            got = half["off"][-1]["requests_per_s"]
            shares.append(round(got / max(runs["off"][-1]["requests_per_s"], 1.0), 3))
            if got:
                rest_ms = max(args.connections / got * 1000 - wait, 0.0)
    pairs = list(zip(runs["off"], runs["on"], strict=True))
    ratios = [
        round(on["requests_per_s"] / off["requests_per_s"], 3) for off, on in pairs if off["requests_per_s"]
    ]
    saturated_added = added(pairs)
    ratio = round(statistics.median(balanced(ratios, ratios=True)), 3)
    added_p50 = round(statistics.median(balanced(saturated_added)), 3)
    lone_added = added(list(zip(lone["off"], lone["on"], strict=True)))
    half_added = added(list(zip(half["off"], half["on"], strict=True)))
    lone_p50 = round(statistics.median(balanced(lone_added)), 3)
    half_p50 = round(statistics.median(balanced(half_added)), 3)
    errors = int(
        sum(
            r["non_2xx"] + r["socket_errors"]
            for rs in (*runs.values(), *lone.values(), *half.values())
            for r in rs
        )
    )
    on, off = median_of(runs["on"]), median_of(runs["off"])
    # What metrics and traces add to each process's CPU per answer (us): the steadier figure.
    cpu = {
        group: round(on[f"{group}_cpu_us_per_request"] - off[f"{group}_cpu_us_per_request"], 1)
        for group in ("gateway", "instance", "up", "platform")
    }
    print(
        json.dumps(
            {
                "benchmark": "metrics",
                "what": "examples/hello through one gateway process and one instance, metrics and "
                "traces on (the defaults) vs off (--no-gateway-metrics, OSLESS_TRACES=off), paired",
                "connections": args.connections,
                "seconds": args.seconds,
                "rounds": args.rounds,
                "off": off,
                "on": on,
                "ratio": ratio,
                "round_ratios": ratios,
                # At saturation the p50 is the queue (connections / throughput): the ratio again.
                "added_p50_ms": added_p50,
                "round_added_p50_ms": saturated_added,
                "added_cpu_us_per_request": cpu,
                "one_connection": {
                    "off_p50_ms": median_of(lone["off"])["p50_ms"],
                    "on_p50_ms": median_of(lone["on"])["p50_ms"],
                    "added_p50_ms": lone_p50,
                    "round_added_p50_ms": lone_added,
                },
                "half_load": {
                    "round_delay_ms": delays,
                    "off_share_of_saturated": statistics.median(shares),
                    "round_off_share_of_saturated": shares,
                    "off_requests_per_s": median_of(half["off"])["requests_per_s"],
                    "on_requests_per_s": median_of(half["on"])["requests_per_s"],
                    "off_p50_ms": median_of(half["off"])["p50_ms"],
                    "on_p50_ms": median_of(half["on"])["p50_ms"],
                    "added_p50_ms": half_p50,
                    "round_added_p50_ms": half_added,
                },
                "load_avg": {"before": load_before, "after": os.getloadavg()},
                "errors": errors,
                "count_ns_per_request": count_ns,
                "trace_ns_per_request": trace_ns,
                # The p50 target applies to the latency figures: one connection and half load.
                "target": {"ratio": TARGET_RATIO, "added_p50_ms": TARGET_ADDED_P50_MS},
                "met": ratio >= TARGET_RATIO
                and errors == 0
                and lone_p50 <= TARGET_ADDED_P50_MS
                and half_p50 <= TARGET_ADDED_P50_MS,
            }
        )
    )


if __name__ == "__main__":
    main()
