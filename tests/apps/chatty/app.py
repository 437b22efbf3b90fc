"""Logs of every kind: a web request and a function that log, print and crash (tests/test_logs.py)."""

import logging
import os
import subprocess
import sys

import osless

app = osless.App("chatty")
log = logging.getLogger("chatty")


@app.function()
def note(event, ctx):
    log.info("noted %s", event["word"])
    print(f"printed {event['word']}", flush=True)
    return {"request_id": ctx.request_id}


@app.function()
def crash(event, ctx):
    os._exit(3)


@app.function(timeout_s=30)
def hog_child(event, ctx):
    # A child past the instance's memory limit: the OOM killer takes it, the instance lives on.
    done = subprocess.run([sys.executable, "-c", "b = b'x' * (600 << 20)"], check=False)
    return {"code": done.returncode}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        log.warning("serving %s", scope["path"])
        status = 404 if scope["path"].endswith("/missing") else 200
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"hi\n"})

    return asgi
