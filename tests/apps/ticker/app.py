"""The schedules of tests/test_schedules.py: one every second, and one (a per-second cron, with its
seconds field, in a time zone) that always fails."""

import time
from datetime import timedelta

import osless

app = osless.App("ticker")


@app.schedule(every=timedelta(seconds=1))
def beat(ctx):
    return {"at": time.time()}


@app.schedule("* * * * * *", tz="Europe/Paris", retries=0)
def broken(ctx):
    raise RuntimeError("a scheduled failure")


@app.function()
def echo(event, ctx):
    return event
