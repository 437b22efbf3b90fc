"""Test app for tests/test_dashboard.py: a web page that prints a log line and shows a config value."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import osless

VERSION = "one"

# The gateway takes a session cookie out of an app's answers, but a page's script on this host may
# still set one: this one sets `?plant=VALUE` as the dashboard's (its author's session, planted).
PLANT = b"""<!doctype html><title>planted</title><script>
document.cookie = "osless_session=" + decodeURIComponent(location.search.slice(7)) + "; Path=/";
</script>"""

app = osless.App("dash")
settings = app.config(
    greeting=osless.Field(str, default="hello"), limit=osless.Field(int, default=10), api_key=osless.Secret
)


@app.web()
def web() -> Any:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        note = unquote(scope.get("query_string", b"").decode("latin-1"))[:200]
        print(f"dash served {note}", flush=True)
        body = f"version={VERSION} greeting={settings.greeting}\n".encode()
        if scope.get("query_string") == b"cookies":  # what cookies reached the app
            body = b"; ".join(v for k, v in scope["headers"] if k == b"cookie")
        headers = [(b"content-type", b"text/plain")]
        if scope.get("query_string", b"").startswith(b"plant="):  # a page whose script plants a session
            body, headers = PLANT, [(b"content-type", b"text/html")]
        if scope.get("query_string") == b"setcookie":  # an app trying to plant the dashboard's session
            headers += [
                (b"set-cookie", b"osless_session=planted; Path=/; HttpOnly"),
                (b"Set-Cookie", b" osless_session =planted2"),
                (b"set-cookie", b"=osless_session=planted3"),  # nameless: sent back as its value
                (b"set-cookie", b"osless_session\xa0=planted4"),  # the API's parser strips the NBSP
                (b"set-cookie", b"theirs=kept; Path=/"),
            ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return asgi


@app.function()
def echo(event: Any, ctx: osless.Context) -> dict[str, Any]:
    return {"echo": event, "greeting": settings.greeting}
