"""A web app that holds each request for `?s=` seconds (no dependencies): requests in flight on demand."""

import asyncio
from urllib.parse import parse_qs

import osless

app = osless.App("holder")


@app.web(timeout_s=30)
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        seconds = float(parse_qs(scope["query_string"].decode()).get("s", ["0"])[0])
        await asyncio.sleep(min(seconds, 20))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"4")],
            }
        )
        await send({"type": "http.response.body", "body": b"held"})

    return asgi
