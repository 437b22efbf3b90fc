"""Message-based work against sync invoke, in one run of a real `osless up` (benchmarks/apps/events):

- `async_accepted_per_s`: async invokes (`X-Osless-Invocation-Type: Event`) accepted per second by
  `--clients` clients, against `sync_per_s`, sync invokes of the same no-op function;
- `handler_start_ms_warm`: from just before a send in app code (`osless.queue("events.lat").send`
  in the app `evsend`: its egress proxy, the node agent, the API, JetStream) to the consumer's handler
  starting (its clock, the same machine's), one message at a time, p50 and p99 over `--messages`
  (`send_ms_warm`: the send alone, until the message is durable); `handler_start_ms_warm_http`: the
  same from an HTTP client's `POST /v1/queues/events/lat/messages`; against `sync_ms_warm`, the
  round trip of a sync invoke of the no-op through the gateway;
- `handler_start_ms` from zero: the app scaled to zero (`--min 0 --idle 1`), one message, `--cold`
  times; against a sync invoke from zero; `from_zero_steps_ms`, where its time went (p50s, from the
  send, read from the platform's own records): `sent` the send until durable, `placed` the instance
  record made (the wake, the scheduler), `ready` its ready report (the fork, the instance's start);
  the handler's start follows (the gateway told, the call relayed). The results are read 0.5 s after
  the send: a read at once was one more call waiting for the instance that starts;
- `drain`: `--backlog` messages (100 a send, 8 senders in `evsend`'s code) queued for a consumer of batch 100
  whose handlers wait until all are queued (2,000 held in flight, the rest in the stream), then let
  go: messages per second from the go to the last batch, instances the autoscaler used (max
  `--max-instances`), and whether every message was handled (`lost`, `duplicates`).

Targets (2 cores): handler start p50 10 ms or less warm, 50 ms or less from zero; 2,000 messages/s or
more drained; nothing lost. The last line is one JSON object.

Measured (this 2-core machine shared with other engineers' test runs; a run takes about 2 minutes):
- 2026-12-06, `--cold 9`, runs alternated, the same code but for the wake at the send (api/wakes.py):
  from zero p50 163, 151 and 119 ms before (p99 595, 447, 149; `placed` 46, 25, 28 ms; `ready` 144,
  89, 101 ms; load 10 to 15), 93, 242, 57 and 75 ms after (p99 348, 582, 112, 295; `placed` 14, 44,
  12, 12 ms; `ready` 65, 85, 33, 54 ms; load 7 to 13): the runs' median 151 ms before, 84 after.
  Sync invokes from zero in the same runs: 102, 98, 115 ms before; 126, 83, 45, 74 ms after.
  Interleaved in one platform (a harness of this app, not kept, with timestamps in each part, the
  wake at the send on for one wake and off for the next, 15 of each; load 4 to 9, three runs): p50
  67, 70 and 64 ms with it against 99, 92 and 54 ms without; the scheduler placed the instance 18 ms
  sooner (10 against 28 ms after the send) and the node forked it 14 ms sooner (29 against 43).
  Where the rest goes, with it (ms after the send, p50): the send reaches the API 7, the instance is
  placed 10, the node forks it 29, it reports ready 52 (the fork and the instance's start: 23), the
  handler starts 67 (the ready report through the API's watch to the gateway, the call relayed to
  the instance): hops between processes (the API, the node, the gateway, the instance), each a
  wait for a core on a loaded machine. Warm, all these runs: handler start p50 7.8 to 17 ms (p99 49
  to 156), of which the send 7.2 to 16 ms; drained 6,363 to 14,794 messages/s with 4 instances,
  none lost, none twice.
- Before (load 9 to 11): async invokes accepted 230/s against 342/s sync (8 clients, within their
  tokens' bursts); enqueue to handler start warm p50 12.6 ms, p99 72 ms, of which the send from app
  code until durable 11.1 ms (its egress proxy, the node agent and the API: four hops before the
  engine) and the delivery 1.5 ms; from an HTTP client p50 12.9 ms; a sync invoke's round trip p50
  5.0 ms. From zero: p50 79 ms, p99 189 ms (5 wakes), a sync invoke from zero p50 148 ms in the
  same run. Drained: 10,000 messages at 7,479/s with 4 instances (106 batches), none lost, none
  twice, none dead. At load 2.5 to 3.3 (the last run before this session's): warm p50 7.2 ms, from
  zero p50 61 ms, a sync invoke from zero 44 ms.
So the drain and nothing-lost targets are met, warm at moderate load; from zero is not shown met
(no run of this session had the machine below load 7; at load 9 to 12 the best run's p50 was 57 ms).

2026-12-06, 19:07-19:52, the machine quiet (load 0.5 to 2.7, no other test run), with the wake at the
send (`api/wakes.py`), three runs of `--cold 9`: from zero p50 45.4, 42.7 and 42.9 ms (p99 74, 51, 53;
a sync invoke from zero 49, 40 and 42 ms in the same runs; placed 12-14 ms and ready 37-39 ms after the
send, which took 11); warm p50 6.9, 8.5 and 8.8 ms (p99 15-19); drained 12,289, 14,551 and 12,072
messages/s with 4 instances; none lost, none twice. Every target met in each run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import uuid
from typing import Any

import httpx
from _platform import ROOT, running_platform

APP_DIR = ROOT / "benchmarks" / "apps" / "events"
APP = "events"
SENDER = "evsend"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))], 2) if ordered else float("nan")


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"p50": pct(values_ms, 0.5), "p99": pct(values_ms, 0.99), "n": len(values_ms)}


def call(api: httpx.Client, fn: str, event: Any, app: str = APP) -> Any:
    r = api.post(f"/v1/apps/{app}/functions/{fn}:invoke", json=event, timeout=620)
    r.raise_for_status()
    return r.json()


def rate(tokens: list[str], per: int, one: Any) -> float:
    """`per` calls of `one(client)` by each of len(tokens) threads, each with its token: calls per second."""

    def worker(token: str) -> None:
        with httpx.Client(
            base_url=BASE["api"], headers={"authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            for _ in range(per):
                one(c)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
        list(pool.map(worker, tokens))
    return round(per * len(tokens) / (time.monotonic() - start), 1)


BASE: dict[str, str] = {}


def client() -> httpx.Client:
    return httpx.Client(
        base_url=BASE["api"], headers={"authorization": f"Bearer {BASE['token']}"}, timeout=60
    )


def stamps(api: httpx.Client, run: str, expect: int) -> list[tuple[float, float]]:
    """(seconds from the send to the handler's start, when it was sent) of each message of `run`."""

    def got() -> list[tuple[float, float]]:
        found = call(api, "results", {"kind": "lat", "run": run})
        return [(float(x[0]), float(x[1])) for x in found or []]

    deadline = time.monotonic() + 120
    while len(found := got()) < expect and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def latencies(api: httpx.Client, run: str, expect: int) -> list[float]:
    return [delay * 1000 for delay, _ in stamps(api, run, expect)]


def at_zero(api: httpx.Client) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not api.get("/v1/instances", params={"app": APP}).json()["items"]:
            return
        time.sleep(0.1)
    raise SystemExit("the app did not go to zero")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--invokes", type=int, default=90, help="per client, within its token's burst")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--max-instances", type=int, default=4)
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "events"}
    with running_platform("oslev-") as p:
        BASE.update(api=p.platform.api, token=p.token, gateway=p.gateway)
        p.osless("deploy", str(APP_DIR))
        p.osless("deploy", str(APP_DIR), "--name", SENDER)
        for queue in ("lat", "drain"):
            p.osless("queue", "allow", f"{APP}.{queue}", "--app", SENDER)
        p.osless("scale", APP, "--min", "1", "--max", str(args.max_instances))
        p.osless("scale", SENDER, "--min", "1")
        api = client()
        call(api, "noop", None)

        # Accepted per second, async against sync of the same function: each client with a token of
        # its own (the API allows a token 20 a second after a burst of 100: measured within the burst).
        tokens = [
            json.loads(p.platform.cli("tokens", "create", "--role", "invoke", "--json").stdout)["token"]
            for _ in range(args.clients)
        ]

        def async_one(c: httpx.Client) -> None:
            r = c.post(
                f"/v1/apps/{APP}/functions/noop:invoke",
                json={},
                headers={"x-osless-invocation-type": "Event"},
            )
            assert r.status_code == 202, r.text

        def sync_one(c: httpx.Client) -> None:
            r = c.post(f"{BASE['gateway']}/_functions/{APP}/noop", json={})
            assert r.status_code == 200, r.text

        out["sync_per_s"] = rate(tokens, args.invokes, sync_one)
        out["async_accepted_per_s"] = rate(tokens, args.invokes, async_one)
        time.sleep(5)  # the tokens' buckets refill (20 a second)

        # Enqueue to handler start, warm: one at a time, sent from the sender app's code.
        run = uuid.uuid4().hex[:8]
        call(api, "probe", {"target": APP, "run": run, "n": 3}, app=SENDER)  # warm the paths
        latencies(api, run, 3)
        run = uuid.uuid4().hex[:8]
        took = call(api, "probe", {"target": APP, "run": run, "n": args.messages}, app=SENDER)
        out["handler_start_ms_warm"] = summary(latencies(api, run, args.messages))
        out["send_ms_warm"] = summary([t * 1000 for t in took])  # of which: the send, until durable
        # The same from outside, `POST /v1/queues/...` (a token of its own: within its burst of 100).
        run = uuid.uuid4().hex[:8]
        with httpx.Client(base_url=BASE["api"], headers={"authorization": f"Bearer {tokens[0]}"}) as c:
            for _ in range(min(args.messages, 90)):
                body = {"messages": [{"body": {"run": run, "t": time.time()}}]}
                c.post(f"/v1/queues/{APP}/lat/messages", json=body).raise_for_status()
                time.sleep(0.02)
        out["handler_start_ms_warm_http"] = summary(latencies(api, run, min(args.messages, 90)))
        sync_ms = []
        with httpx.Client(headers={"authorization": f"Bearer {BASE['token']}"}, timeout=60) as gw:
            for _ in range(args.messages):
                t0 = time.monotonic()
                gw.post(f"{BASE['gateway']}/_functions/{APP}/noop", json={}).raise_for_status()
                sync_ms.append((time.monotonic() - t0) * 1000)
                time.sleep(0.02)
        out["sync_ms_warm"] = summary(sync_ms)

        # From zero.
        p.osless("scale", APP, "--min", "0", "--idle", "1")
        cold, sync_cold = [], []
        steps: dict[str, list[float]] = {"sent": [], "placed": [], "ready": []}
        for _ in range(args.cold):
            at_zero(api)
            run = uuid.uuid4().hex[:8]
            took = call(api, "probe", {"target": APP, "run": run, "n": 1}, app=SENDER)
            # Read once the handler surely ran: a read now is one more call waiting for the instance
            # that starts, and work for the API, during what is measured.
            time.sleep(0.5)
            ((delay, sent),) = stamps(api, run, 1)
            cold.append(delay * 1000)
            steps["sent"].append(took[0] * 1000)
            # Where the time went, from the platform's own records: the instance record made
            # (the wake, the scheduler), its ready report (the fork, the instance's start).
            woken = [
                i
                for i in api.get("/v1/instances", params={"app": APP}).json()["items"]
                if i["created_at"] >= sent - 0.01
            ]
            if woken:
                first = min(woken, key=lambda i: i["created_at"])
                steps["placed"].append((first["created_at"] - sent) * 1000)
                if first["status"]["phase"] == "ready":
                    steps["ready"].append((first["status"]["updated_at"] - sent) * 1000)
            at_zero(api)
            t0 = time.monotonic()
            call(api, "noop", None)
            sync_cold.append((time.monotonic() - t0) * 1000)
        out["handler_start_ms_from_zero"] = summary(cold)
        out["from_zero_steps_ms"] = {name: pct(values, 0.5) for name, values in steps.items()}
        out["sync_ms_from_zero"] = summary(sync_cold)

        # A backlog drained with autoscaling: queued whole (the handlers hold until then), then let go.
        p.osless("scale", APP, "--min", "1", "--idle", "60", "--target", "5")
        run = uuid.uuid4().hex[:8]
        took = call(api, "fill", {"target": APP, "run": run, "n": args.backlog}, app=SENDER)
        out["enqueue_per_s"] = round(args.backlog / took, 1)
        went = call(api, "go", {"run": run})
        deadline = time.monotonic() + 600
        done: dict[str, Any] = {}
        while time.monotonic() < deadline:
            done = call(api, "results", {"kind": "drain", "run": run}) or {}
            if done.get("handled", 0) >= args.backlog:
                break
            time.sleep(0.5)
        stats = api.get(f"/v1/queues/{APP}/drain").json()
        out["drain"] = {
            "messages": args.backlog,
            "per_s": round(done.get("handled", 0) / max(1e-6, done.get("last", went) - went), 1),
            "instances": done.get("instances"),
            "batches": done.get("batches"),
            "lost": args.backlog - done.get("unique", 0),
            "duplicates": done.get("handled", 0) - done.get("unique", 0),
            "left_in_queue": stats.get("depth"),
            "dlq": stats.get("dlq_depth"),
        }
        api.close()
    warm, zero, drained = out["handler_start_ms_warm"], out["handler_start_ms_from_zero"], out["drain"]
    out["target_met"] = bool(
        warm["p50"] <= 10 and zero["p50"] <= 50 and drained["per_s"] >= 2000 and drained["lost"] == 0
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
