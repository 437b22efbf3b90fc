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


# Yearly: they tick in the test only when their last run is set back (test_schedules_follow_...).
@app.schedule("0 0 1 1 *", catch_up=True)
def yearly_caught_up(ctx):
    return "caught up"


@app.schedule("0 0 1 1 *")
def yearly_skipped(ctx):
    return "never"
