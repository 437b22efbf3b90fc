"""A function and a Starlette web app: `osless deploy examples/hello`."""

import osless

app = osless.App("hello")


@app.function(timeout_s=10)
def greet(event, ctx):
    name = (event or {}).get("name", "world")
    print(f"greeting {name} ({ctx.request_id})")
    return {"message": f"Hello, {name}!", "request_id": ctx.request_id}


@app.web()
def web():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def index(request):
        return PlainTextResponse("Hello from osless!\n")

    async def echo(request):
        return JSONResponse(
            {
                "path": request.url.path,
                "query": dict(request.query_params),
                "root_path": request.scope["root_path"],
            }
        )

    return Starlette(routes=[Route("/", index), Route("/echo", echo)])
