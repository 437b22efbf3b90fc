import osless

VERSION = "one"

app = osless.App("versioned")


@app.function()
def version(event, ctx):
    return VERSION


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": VERSION.encode()})

    return asgi
