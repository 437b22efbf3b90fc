"""A raw ASGI app that answers its own scope, in front of a Starlette app: what an app is given."""

import json

import osless

app = osless.App("scoped")


@app.web()
def web():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def x(request):
        return JSONResponse({"handler": "/x", "path": request.url.path})

    async def scoped_x(request):
        return JSONResponse({"handler": "/scoped/x", "path": request.url.path})

    routed = Starlette(routes=[Route("/x", x), Route("/scoped/x", scoped_x)])

    async def raw(scope, receive, send):
        if scope["type"] == "lifespan" or not scope["path"].endswith("/scope"):
            await routed(scope, receive, send)
            return
        seen = {k: scope[k] for k in ("type", "path", "root_path")}
        seen["raw_path"] = scope["raw_path"].decode("latin-1")
        body = json.dumps(seen).encode()
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": body.decode()})
            await send({"type": "websocket.close"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return raw
