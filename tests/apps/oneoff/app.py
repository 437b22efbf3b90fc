"""For tests/test_runs.py: one-off commands (`osless run`) and release steps of an app with a volume
and config. `tools.py` is what the commands run."""

import osless

app = osless.App("oneoff", volumes={"/data": "oneoff-data"})
settings = app.config(greeting=osless.Field(str, default="hi"), password=osless.Secret)


@app.function()
def note(event, ctx):
    try:
        with open("/data/note") as f:
            return {"note": f.read()}
    except FileNotFoundError:
        return {"note": None}
