import asyncio
import time

import osless

app = osless.App("slow")


@app.function(timeout_s=1)
def nap(event, ctx):
    time.sleep(float(event or 3))
    return "rested"


@app.web(timeout_s=1, max_duration_s=2)
def web():
    async def asgi(scope, receive, send):
        if scope["type"] == "websocket":  # an echo, for as long as it is allowed to live
            await receive()
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": message.get("text")})
            return
        if scope["type"] != "http":
            return
        path = scope["path"].removeprefix(scope["root_path"])  # the path holds the /{app} prefix
        if path == "/forever":  # never silent for long, but never done
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.3)
        if path == "/stream":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            for i in range(5):
                await send({"type": "http.response.body", "body": f"chunk {i}\n".encode(), "more_body": True})
                await asyncio.sleep(0.2)
            await send({"type": "http.response.body", "body": b""})
            return
        await asyncio.sleep(3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"too late"})

    return asgi
