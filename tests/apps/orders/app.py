"""The callee of tests/test_invoker.py: a function other apps are allowed to call, one that none
is, and one anyone may call through the gateway."""

import osless

app = osless.App("orders")


@app.function()
def quote(event, ctx):
    return {"price": 3 * int((event or {}).get("qty", 1))}


@app.function()
def refund(event, ctx):
    return {"refunded": True}


@app.function(public=True)
def ping(event, ctx):
    return {"pong": True}


@app.function()
def bulky(event, ctx):
    """A result as large as asked: what the API may hold of one is bounded."""
    return "x" * int(event["bytes"])


@app.function(public=True)
def fragile(event, ctx):
    """A public function that fails with what only its owner should read."""
    raise RuntimeError("cannot reach postgres://orders:hunter2@db/orders")
