"""The smallest app: one function, no dependencies."""

import osless

app = osless.App("hello")


@app.function()
def greet(event, ctx):
    return {"hello": event.get("name", "world")}
