"""An app that is told things: typed settings, a secret, a restart-only field, a change hook."""

import hashlib
import os

import osless

app = osless.App("configured")
settings = app.config(
    greeting=osless.Field(str, default="hello"),
    max_items=osless.Field(int, default=10),
    ratio=osless.Field(float, default=0.5),
    enabled=osless.Field(bool, default=False),
    extra=osless.Field(osless.JSON, default=None),
    db_password=osless.Secret,
    workers=osless.Field(int, default=4, restart=True),
)
WORKERS_AT_START = settings.workers  # read once, at import: only a restart changes it
changes = []


@app.on_config_change
def remember(changed):
    changes.append(sorted(changed))


@app.function()
def read(event, ctx):
    return {
        "greeting": settings.greeting,
        "max_items": settings.max_items,
        "ratio": settings.ratio,
        "enabled": settings.enabled,
        "extra": settings.extra,
        "workers_at_start": WORKERS_AT_START,
        "pid": os.getpid(),
    }


@app.function()
def password_digest(event, ctx):
    return hashlib.sha256(settings.db_password.encode()).hexdigest()


@app.function()
def leak_password(event, ctx):
    raise RuntimeError("refusing to print the password")  # the traceback must not carry the secret


@app.function()
def hook_calls(event, ctx):
    return changes


@app.function()
def token(event, ctx):
    return os.environ.get("OSLESS_TOKEN")


@app.function()
def call_other(event, ctx):
    import urllib.request

    with urllib.request.urlopen(osless.service(event["app"]).url + event.get("path", "/"), timeout=10) as r:
        return {"status": r.status, "body": r.read().decode()}
