"""The dashboard's door in front of the API: `/ui` pages, and the session cookie turned into a token.

Outermost of the API's middlewares. `/ui/...` goes to the dashboard's pages (`ui.routes`), which
answer a visitor without a session with a redirect to the sign-in page and nothing else. A `/v1`
request with no `Authorization` header but a valid session cookie goes on to the guard with the
session's token as its bearer: the dashboard's changes are the REST API's own calls, checked,
throttled and audited as the CLI's are. Such a change (anything but GET and HEAD) must carry the
session's CSRF value in `X-Osless-CSRF`, and an `Origin`, when sent, must be this host's: else 403.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from osless.api.errors import error_body
from osless.api.state import ApiState
from osless.api.ui.routes import build_ui
from osless.api.ui.session import (
    CSRF_HEADER,
    Session,
    from_our_pages,
    open_session,
    same_origin,
    session_cookie,
    signed_out,
)
from osless.store import Store

__all__ = ["UiGate", "cookie_of"]

READS = frozenset({"GET", "HEAD"})
# On every /v1 answer: it is data, never a page of this origin (the dashboard's). A function's answer
# keeps its own content type (`POST .../functions/{fn}:invoke`), and a profile is an SVG with script:
# opened in a browser, neither may run script as the API's origin, sniffed into HTML or framed.
API_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"sandbox; default-src 'none'; frame-ancestors 'none'"),
]
SIGNOUT_CHECK_S = 5.0  # a stream the session opened asks this often whether its token signed out


def cookie_of(headers: Headers) -> str | None:
    return session_cookie(headers.get("cookie"))


class UiGate:
    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state
        self.api_app: Any = None  # the FastAPI app this gate is part of: its routes read their state from it
        self.ui = build_ui(state, self._inner)

    async def _inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API below this gate, for the pages' own reads (`routes.ApiReader`)."""
        await self.app({**scope, "app": self.api_app}, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        self.api_app = scope.get("app")
        if path == "/ui" or path.startswith("/ui/"):
            await self.ui(scope, receive, send)
            return
        if path.startswith("/v1/"):
            send = _as_data(send)
        headers = Headers(scope=scope)
        if path.startswith("/v1/") and "authorization" not in headers and from_our_pages(headers):
            session = open_session(self.state.secrets, cookie_of(headers))
            if session is not None and await signed_out(self.state.resources.store, session):
                session = None  # its token signed out since: the cookie is kept by the browser only
            if session is not None:
                if scope["method"] not in READS and not (
                    session.csrf_ok(headers.get(CSRF_HEADER)) and same_origin(headers)
                ):
                    await _forbidden(send)
                    return
                scope = dict(scope)
                scope["headers"] = [
                    *scope["headers"],
                    (b"authorization", f"Bearer {session.token}".encode()),
                ]
                await _until_signed_out(self.app, scope, receive, send, self.state.resources.store, session)
                return
        await self.app(scope, receive, send)


async def _until_signed_out(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, store: Store, session: Session
) -> None:
    """`app` for a request the session speaks for, whose answer, if it is a stream (a watch, a log
    followed), ends once the token signs out: a copy of the cookie would otherwise keep it open.
    A stream waits on `receive` for the client's disconnect (Starlette, ASGI spec < 2.4); told one
    at the first check after the sign-out, it stops, and its answer is ended here."""
    body_read = False
    told = False
    ended = False

    async def watched_receive() -> Message:
        nonlocal body_read, told
        if not body_read:
            message = await receive()
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        waiting = asyncio.ensure_future(receive())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=SIGNOUT_CHECK_S)
                if done:
                    return waiting.result()
                if await signed_out(store, session):
                    told = True
                    return {"type": "http.disconnect"}
        finally:
            waiting.cancel()

    async def watched_send(message: Message) -> None:
        nonlocal ended
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended = True
        await send(message)

    await app(scope, watched_receive, watched_send)
    if told and not ended:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _as_data(send: Send) -> Send:
    """`send`, its answer's head with API_HEADERS."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *API_HEADERS]}
        await send(message)

    return sending


async def _forbidden(send: Send) -> None:
    body = error_body(
        "csrf_failed",
        "this change came with the dashboard's session cookie but without its CSRF value "
        f"(the {CSRF_HEADER} header a dashboard page sends once this browser signed in to that session) "
        "or from another origin: sign in again, or call the API with 'Authorization: Bearer <token>'",
    )
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
