import time

import osless

app = osless.App("debuggee")


def sleepy_handler(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def busy_loop(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(200))
    return n


@app.function(timeout_s=30)
def sleep(event, ctx):
    return sleepy_handler(float(event or 3))


@app.function(timeout_s=30)
def burn(event, ctx):
    return busy_loop(float(event or 3))


app_thing = "the debuggee's thing"  # `osless debug shell` prints it


def hello_handler(name: str) -> bytes:
    greeting = f"hello {name}"  # the attach test's breakpoint
    return greeting.encode()


@app.web(timeout_s=60)
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"].removeprefix(scope["root_path"])
        body = __file__.encode() if path == "/where" else hello_handler("debugger")
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})

    return asgi
