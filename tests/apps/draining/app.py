"""Test app for tests/test_supervisor.py's stops: requests that outlast 5 s, answered across a restart,
a deploy and a config change, and an instance that ignores SIGTERM. Its handlers' longest timeout is
15 s: a replaced instance gets 15 + 1 + 5 s after SIGTERM."""

import asyncio
import json
import os
import secrets
import signal
import time
from urllib.parse import parse_qs

import osless

VERSION = "one"

if VERSION != "one":
    time.sleep(4)  # a new release is slow to start: the old one serves meanwhile

app = osless.App("draining")
settings = app.config(colour=osless.Field(str, default="red", restart=True))


RUN = ""  # a run's own (the zygote forks every run of an instance, with the same id)


def _new_run() -> None:
    global RUN
    RUN = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_run)


def _who() -> dict[str, object]:
    return {"instance": os.environ.get("OSLESS_INSTANCE"), "run": RUN, "version": VERSION}


@app.function(timeout_s=15)
def nap(event, ctx):
    time.sleep(float(event["s"]))
    return {"slept": event["s"], **_who()}


@app.function(timeout_s=5)
def who(event, ctx):
    return _who()


@app.function(timeout_s=5)
async def deaf(event, ctx):
    # On the loop's thread, the main one (signal handlers live there): SIGTERM now does nothing.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return _who()


@app.web(timeout_s=15)
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        query = parse_qs(scope["query_string"].decode())
        await asyncio.sleep(float(query.get("s", ["0"])[0]))
        body = json.dumps(_who()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return asgi
