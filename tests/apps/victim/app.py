"""An ordinary app with a volume: it must keep serving, and keep its data, whatever `hostile` does."""

import os

import osless

app = osless.App("victim", volumes={"/data": "victim-data"})


@app.function()
def put(event, ctx):
    with open("/data/note.txt", "w") as f:
        f.write(event["text"])
    return "stored"


@app.function()
def get(event, ctx):
    try:
        with open("/data/note.txt") as f:
            return f.read()
    except FileNotFoundError:
        return None


@app.function()
def where(event, ctx):
    return {"code": os.path.dirname(os.path.abspath(__file__))}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"fine"})

    return asgi
