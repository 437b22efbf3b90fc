"""benchmarks/events.py's app: a no-op function (sync and async invoke), a latency consumer that
records when its handler starts, and a drain consumer that records each batch, all on a volume."""

import json
import os
import time
from pathlib import Path

import osless

app = osless.App("events", volumes={"/data": "events-data"})
DATA = Path("/data")


@app.function()
def noop(event, ctx):
    return None


@app.on_message("lat", batch_size=1, max_concurrency=20)
def lat(messages, ctx):
    started = time.time()
    with open(DATA / f"lat-{messages[0].body['run']}", "a") as f:
        for m in messages:
            f.write(f"{started - m.body['t']:.6f} {m.body['t']:.6f}\n")


@app.on_message("drain", batch_size=100, max_concurrency=20, visibility_timeout_s=120)
def drain(messages, ctx):
    run = messages[0].body["run"]
    while not (DATA / f"go-{run}").exists():  # held until the whole backlog is queued
        time.sleep(0.01)
    line = {
        "t": time.time(),
        "i": os.environ.get("OSLESS_INSTANCE", ""),
        "n": [m.body["n"] for m in messages],
    }
    with open(DATA / f"drain-{run}", "a") as f:
        f.write(json.dumps(line) + "\n")


@app.function()
def go(event, ctx):
    (DATA / f"go-{event['run']}").touch()
    return time.time()


@app.function(timeout_s=60)
def results(event, ctx):
    path = DATA / f"{event['kind']}-{event['run']}"
    if not path.exists():
        return None
    if event["kind"] == "lat":  # [seconds from the send to the handler's start, when it was sent]
        return [[float(x) for x in line.split()] for line in path.read_text().splitlines()]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    seen = [n for line in lines for n in line["n"]]
    return {
        "handled": len(seen),
        "unique": len(set(seen)),
        "first": min(line["t"] for line in lines),
        "last": max(line["t"] for line in lines),
        "instances": len({line["i"] for line in lines}),
        "batches": len(lines),
    }


# The producer's side (deployed again as `evsend`, granted `events.lat` and `events.drain`): sends from
# app code, through its node's egress proxy and the API, as apps send.
@app.function(timeout_s=600)
def probe(event, ctx):
    """One message at a time to `{target}.lat`, each stamped just before its send."""
    q = osless.queue(f"{event['target']}.lat")
    took = []  # each send's own time: until the platform holds the message durably
    for _ in range(event["n"]):
        t = time.time()
        q.send({"run": event["run"], "t": t})
        took.append(time.time() - t)
        time.sleep(event.get("gap", 0.02))
    return took


@app.function(timeout_s=600)
def fill(event, ctx):
    """`n` messages to `{target}.drain`, 100 a send, from `senders` threads; seconds it took."""
    from concurrent.futures import ThreadPoolExecutor

    q = osless.queue(f"{event['target']}.drain")
    n, run = event["n"], event["run"]
    chunks = [list(range(k, min(k + 100, n))) for k in range(0, n, 100)]
    t0 = time.time()
    with ThreadPoolExecutor(event.get("senders", 8)) as pool:
        list(pool.map(lambda c: q.send_batch([{"run": run, "n": i} for i in c]), chunks))
    return time.time() - t0
