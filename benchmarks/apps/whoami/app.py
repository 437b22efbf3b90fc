"""Answers which instance it is: the relay benchmark tells local answers from relayed ones by it."""

import os

import osless

app = osless.App("whoami")


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = os.environ.get("OSLESS_INSTANCE", "").encode()  # read per request: set after the fork
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return asgi
