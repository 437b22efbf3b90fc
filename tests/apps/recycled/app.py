"""Test app for tests/test_supervisor.py: functions that overrun, block the loop, or cut egress."""

import os
import signal
import threading
import time
import urllib.request

import osless

app = osless.App("recycled", egress=[])


@app.function(timeout_s=1)
def overrun(event, ctx):
    time.sleep(60)  # a thread cannot be stopped: only replacing the instance ends it
    return "too late"


@app.function(timeout_s=1)
async def block(event, ctx):
    time.sleep(3600)  # blocks the instance's event loop itself: only the health check sees it
    return "never"


@app.function()
def whoami(event, ctx):
    return {"pid": os.getpid(), "threads": threading.active_count()}


@app.function()
def cut_egress(event, ctx):
    """Kill the sandbox's egress forwarder: the children of pid 1 other than this instance."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == 1:
            os.kill(int(entry), signal.SIGKILL)
            killed.append(int(entry))
    return killed


@app.function()
def fetch_self(event, ctx):
    try:
        with urllib.request.urlopen("http://recycled.osless/", timeout=5) as r:
            return {"status": r.status, "body": r.read().decode()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    return asgi
