"""A hostile web app: it writes its answers on the socket by hand, with a second answer behind the
first (in the same write), hoping the gateway hands it to whoever asks next on the connection."""

import osless

app = osless.App("splitter")

SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nsmuggled"
FIRST = {
    "/extra": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfirst",
    "/no-content": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/head": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfirst",
}


@app.web()
def web():
    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        cycle = send.__self__  # uvicorn's request cycle, and through it the socket
        path = scope["path"][len(scope.get("root_path", "")) :]
        cycle.transport.transport.write(FIRST[path] + SMUGGLED)  # one write
        cycle.response_started = cycle.response_complete = True
        cycle.on_response()  # the connection is idle again, as after any answer

    return asgi
