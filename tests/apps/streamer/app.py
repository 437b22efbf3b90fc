"""A web app with the long-lived shapes: slow responses, server-sent events and a websocket echo."""

import asyncio

import osless

app = osless.App("streamer")


@app.function()
def ping(event, ctx):
    return "pong"


@app.web(timeout_s=30)
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    async def slow(request):
        await asyncio.sleep(float(request.query_params.get("s", "0.2")))
        return PlainTextResponse("done")

    async def events(request):
        async def stream():
            for i in range(3):
                yield f"data: tick {i}\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def echo(websocket):
        await websocket.accept()
        async for message in websocket.iter_text():
            await websocket.send_text(f"echo: {message}")

    return Starlette(
        routes=[
            Route("/slow", slow),
            Route("/work", slow, methods=["GET", "POST"]),
            Route("/events", events),
            WebSocketRoute("/ws", echo),
        ]
    )
