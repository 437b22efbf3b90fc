"""An app with a 16 MB volume, which it fills until the disk says no."""

import os

import osless

app = osless.App("quota", volumes={"/data": osless.Volume("quota-data", size_mb=16)})
MB = 1024 * 1024


@app.function()
def put(event, ctx):
    with open(f"/data/{event['name']}", "w") as f:
        f.write(event["text"])
    return "stored"


@app.function()
def get(event, ctx):
    try:
        with open(f"/data/{event['name']}") as f:
            return f.read()
    except FileNotFoundError:
        return None


@app.function()
def fill(event, ctx):
    """Write 1 MB at a time to /data/fill.bin until an error, or `max_mb`; report how far it got."""
    written = 0
    try:
        with open("/data/fill.bin", "wb") as f:
            while written < event["max_mb"] * MB:
                f.write(b"x" * MB)
                f.flush()
                written += MB
            os.fsync(f.fileno())
    except OSError as e:
        return {"written_mb": written / MB, "errno": e.errno}
    return {"written_mb": written / MB, "errno": None}


@app.function()
def drop(event, ctx):
    os.unlink("/data/fill.bin")
    return "dropped"


@app.function()
def space(event, ctx):
    st = os.statvfs("/data")
    return {"total_mb": st.f_blocks * st.f_frsize / MB, "files": sorted(os.listdir("/data"))}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"fine"})

    return asgi
