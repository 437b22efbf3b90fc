"""An app that says which instance answered: over HTTP, a websocket and functions; and calls
itself by name (`http://relayed.osless`), as one app calls another. `/die?on=ID`: the instance ID
dies of the request, before answering."""

import os
import urllib.parse
import urllib.request

import osless

app = osless.App("relayed")


def me():
    # Read each time: the app is imported by the zygote, before any instance is forked from it.
    return os.environ.get("OSLESS_INSTANCE", "")


@app.function()
def where(event, ctx):
    return me()


@app.function()
def call(event, ctx):
    # Through the sandbox's HTTP_PROXY: the node's egress proxy, then the node's gateway.
    with urllib.request.urlopen(osless.service("relayed").url + "/", timeout=10) as r:
        return {"caller": me(), "callee": r.read().decode()}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": f"{me()} {message.get('text')}"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"].removeprefix(scope["root_path"])  # the path holds the /{app} prefix
        body = me().encode()
        if path == "/die" and urllib.parse.parse_qs(scope["query_string"].decode()).get("on") == [me()]:
            os._exit(1)  # the request reached this instance, which dies before answering
        if path == "/echo":  # the request's body back: big bodies cross the relay both ways
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
        headers = [(b"content-type", b"text/plain"), (b"x-instance", me().encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return asgi
