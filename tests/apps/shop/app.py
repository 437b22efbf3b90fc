"""The caller of tests/test_invoker.py: calls another app's function from its own code."""

import json
import os
import urllib.error
import urllib.request

import osless

app = osless.App("shop")


@app.function()
def buy(event, ctx):
    """Calls event["target"] with event["event"], as an app would."""
    try:
        result = osless.function(event["target"]).call(event.get("event"))
    except osless.FunctionCallError as e:
        return {"error": {"status": e.status, "code": e.code, "message": str(e)}}
    return {"result": result}


@app.function()
async def abuy(event, ctx):
    try:
        return {"result": await osless.function(event["target"]).acall(event.get("event"))}
    except osless.FunctionCallError as e:
        return {"error": {"status": e.status, "code": e.code, "message": str(e)}}


@app.function()
def forge(event, ctx):
    """The call by hand, with headers that claim to be another app."""
    request = urllib.request.Request(
        event["url"],
        data=b"{}",
        method="POST",
        headers={"content-type": "application/json", **event["headers"]},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()[:1000]}


@app.function()
def leak(event, ctx):
    """What an app could hand out: its own token."""
    return os.environ["OSLESS_TOKEN"]
