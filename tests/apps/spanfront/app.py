"""The front of tests/test_traces.py: a web app (plain ASGI) that says which traceparent it got, and
on /call calls spanback.work, so the trace goes across two apps."""

import json

import osless

app = osless.App("spanfront")


async def _asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    headers = dict(scope["headers"])
    result = None
    if scope["path"].endswith("/call"):
        result = await osless.function("spanback.work").acall({"n": 2})
    body = json.dumps({"traceparent": headers.get(b"traceparent", b"").decode(), "result": result})
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body.encode()})


@app.web()
def web():
    return _asgi
