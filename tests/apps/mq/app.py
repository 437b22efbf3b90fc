"""The consumer of tests/test_queues.py: each message it sees is recorded on a volume, per key (a
retry may land on another instance). `{"poison": true}` raises; `{"fail": true}` fails alone
(`osless.BatchFailed`). FIXED (rewritten by the test for a fixing deploy) turns poison harmless."""

import json
import os
import time
from pathlib import Path

import osless

FIXED = False

app = osless.App("mq", volumes={"/data": "mq-data"})


def _record(key: str, line: dict) -> None:
    with open(Path("/data") / key, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(line) + "\n")


@app.on_message("orders", batch_size=10, retries=1, visibility_timeout_s=10)
def handle(messages, ctx):
    failed = []
    for m in messages:
        _record(
            m.body["key"],
            {
                "id": m.id,
                "n": m.body.get("n"),
                "attempt": m.attempt,
                "batch": len(messages),
                "at": time.time(),
            },
        )
        time.sleep(m.body.get("hold", 0))
        if m.body.get("crash") and m.attempt == 1:
            os._exit(3)  # the instance dies with the batch in it
        if m.body.get("poison") and not FIXED:
            raise ValueError("poison message")
        if m.body.get("fail") and m.attempt == 1:
            failed.append(m.id)
    if failed:
        raise osless.BatchFailed(failed)


@app.function(retries=0)
def broken(event, ctx):
    if not FIXED:
        raise RuntimeError("broken until fixed")
    _record(event["key"], {"fixed": True})
    return "fixed"


@app.function()
def seen(event, ctx):
    path = Path("/data") / event["key"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@app.function()
def send(event, ctx):
    try:
        return {"ids": osless.queue(event["queue"]).send_batch(event["bodies"])}
    except osless.QueueSendError as e:
        return {"status": e.status, "code": e.code, "message": e.message}


@app.function(timeout_s=30)
def hold(event, ctx):
    time.sleep(event["s"])


@app.function()
def whoami(event, ctx):
    return os.environ.get("OSLESS_APP")
