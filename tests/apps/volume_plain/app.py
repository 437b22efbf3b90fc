"""An app whose volume is a plain name: it gets the default size."""

import os

import osless

app = osless.App("notes", volumes={"/data": "notes-data"})


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
def link(event, ctx):
    """A symlink in the volume to a path of the app's choosing: the host must never follow it."""
    os.symlink(event["target"], f"/data/{event['name']}")
    return "linked"


@app.function()
def space(event, ctx):
    st = os.statvfs("/data")
    return {"total_mb": st.f_blocks * st.f_frsize / (1024 * 1024), "files": sorted(os.listdir("/data"))}


@app.function()
def fifo(event, ctx):
    """A fifo in the volume: a reader that opened it would wait for a writer that never comes."""
    os.mkfifo(f"/data/{event['name']}")
    return "made"
