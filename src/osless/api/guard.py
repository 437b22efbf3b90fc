"""The API's front door, before any routing: who is calling, how fast, and the record of their writes.

A pure ASGI middleware, so that a caller without a valid token learns nothing of the routes (no 404,
405 or redirect first): every path but `/healthz` answers 401 to them. Then each caller has a token
bucket (429 past it); callers that fail to authenticate share one per client address. Writes that
reached a route go to the audit log (api/audit.py) once answered.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from osless.api import audit, awslambda
from osless.api.auth import ID_LEN, PLATFORM_ROLES, ROUTINE, Caller
from osless.api.errors import error_body
from osless.api.ratelimit import Buckets, Rate
from osless.api.state import ApiState

__all__ = ["CALLER_RATE", "OPEN_PATHS", "STRANGER_RATE", "Guard"]

log = logging.getLogger("osless.api.guard")

OPEN_PATHS = frozenset({"/healthz"})
CALLER_RATE = Rate(per_s=20, burst=100)  # per token, for people's and apps' tokens
STRANGER_RATE = Rate(per_s=5, burst=50)  # per client address, for requests that fail to authenticate
# The platform's own parts act many times a second: never throttle them.
UNLIMITED_ROLES = PLATFORM_ROLES
READS = frozenset({"GET", "HEAD"})

MISSING = (
    "missing bearer token: send 'Authorization: Bearer <token>' "
    "(the CLI reads it from `osless up`'s saved credentials or OSLESS_TOKEN)"
)


class Guard:
    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state
        self.callers = Buckets(CALLER_RATE)
        self.strangers = Buckets(STRANGER_RATE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else None
        caller, code, message = await self._authenticate(scope)
        if caller is None:
            wait = self.strangers.take(address or "")
            if wait:
                await _refuse(scope, send, 429, "too_many_requests", _slow_down(wait, "failed"), wait)
            else:
                await _refuse(scope, send, 401, code, message)
            return
        if caller.role not in UNLIMITED_ROLES and (wait := self.callers.take(caller.id)):
            await _refuse(scope, send, 429, "too_many_requests", _slow_down(wait, "this token's"), wait)
            return
        scope["osless.caller"] = caller
        if scope["type"] != "http" or scope["method"] in READS:
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def watched(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, watched)
        finally:
            await self._audit(scope, caller, status, address)

    async def _authenticate(self, scope: Scope) -> tuple[Caller | None, str, str]:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            # boto3 signs Lambda calls with SigV4 and sends the osless token beside the signature.
            token = awslambda.token_of(scope)
            if not token:
                return None, "unauthorized", awslambda.MISSING if awslambda.is_lambda(scope) else MISSING
        app = self.state.secrets.app_of(token)
        if app is not None:
            return Caller(id=f"app:{app}", name=f"app:{app}", role="app", app=app), "", ""
        scoped = self.state.secrets.scoped_of(token)
        if scoped is not None:
            role, app, holder, expires = scoped
            if role == "peer":  # another server: for no app
                return (
                    Caller(id=f"peer:{holder}", name=f"peer:{holder}", role=role, expires_at=expires),
                    "",
                    "",
                )
            name = f"{role}:{app}@{holder}" if holder else f"{role}:{app}"
            return Caller(id=f"{role}:{app}", name=name, role=role, app=app, expires_at=expires), "", ""
        found = await self.state.tokens.lookup(token)
        if found is None:
            return None, "unauthorized", "invalid token"
        digest, record = found
        if record.expired():
            return None, "token_expired", "token expired: ask an admin for a new one (`osless tokens create`)"
        self.state.tokens.touch(digest)
        caller = Caller(
            id=digest[:ID_LEN],
            name=record.name,
            role=record.role,
            app=record.app,
            expires_at=record.expires_at,
            functions=None if record.functions is None else tuple(record.functions),
        )
        return caller, "", ""

    async def _audit(self, scope: Scope, caller: Caller, status: int, address: str | None) -> None:
        permission = scope.get("osless.permission")
        if permission is None:
            return  # no route was reached (an unknown path or method)
        if caller.role in PLATFORM_ROLES and permission in ROUTINE:
            return  # the control loop's routine reports (instance status, heartbeats...) would drown it
        query = scope.get("query_string", b"").decode("latin-1")
        app = scope.get("path_params", {}).get("app") or (parse_qs(query).get("app") or [None])[0]
        try:
            await audit.record(
                self.state.resources.store,
                token=caller.id,
                name=caller.name,
                role=caller.role,
                method=scope["method"],
                path=scope["path"] + (f"?{query}" if query else ""),
                status=status,
                app=app,
                client=address,
            )
        except Exception:  # the answer is sent; a failed record must not turn it into an error
            log.exception("could not record %s %s in the audit log", scope["method"], scope["path"])


def _slow_down(wait: float, whose: str) -> str:
    return f"too many requests: {whose} limit is reached; retry in {Buckets.retry_after(wait)} s"


async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str, wait: float = 0) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    if awslambda.is_lambda(scope):  # in the shape boto3 reads
        headers, body = awslambda.error(status, code, message)
    else:
        headers, body = (
            [(b"content-type", b"application/json")],
            json.dumps(error_body(code, message)).encode(),
        )
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if wait:
        headers.append((b"retry-after", Buckets.retry_after(wait).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
