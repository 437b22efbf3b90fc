"""The app of benchmarks/config_push.py: one config key, read on every call; no dependencies."""

import osless

app = osless.App("config-push")
settings = app.config(greeting=osless.Field(str, default="x"))


@app.function()
def greet(event, ctx):
    return {"greeting": settings.greeting}
