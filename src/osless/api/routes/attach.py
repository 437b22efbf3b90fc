"""`WS /v1/apps/{app}/debug/attach`: a debugger's stream to debugpy in a running instance
(`osless debug attach`, issue 14), through the API to the node running it (`node.attach`).

Query: `instance` (else the app's first running one), `timeout` (seconds, default 30 min, at most
4 h), `rotation` (`leave`, the default: the instance is out of the gateway's rotation while
attached; `keep`). Refused before the websocket opens, with the one error body and its status: 403
without the `debug` permission (or for another app), 404 no such app or instance, 409 nothing
running, 400 a bad query. Once open: a JSON text frame `{"op": "attached", "instance", "node",
"timeout"}`, then binary frames carry the DAP stream both ways, until a JSON `{"op": "end",
"reason"}` and the close. The node is shown a `debugger` token made for it and the app, never the
caller's. Every attempt is audited, refused ones too (`ATTACH`, with its status), and each
session's end (`DETACH`: how long, and why it ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from urllib.parse import urlencode

from fastapi import APIRouter
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from osless.api import audit
from osless.api.auth import Caller
from osless.api.errors import ApiError, error_body
from osless.api.routes.debug import _targets
from osless.api.state import ApiState
from osless.bounds import cap
from osless.contracts import ID_PATTERN, Instance, Node

router = APIRouter(tags=["debug"])

log = logging.getLogger("osless.api.attach")

DEFAULT_TIMEOUT_S = 1800.0
MAX_TIMEOUT_S = 4 * 3600.0  # the node's own cap
TOKEN_TTL_S = 60.0  # the node checks it when the session opens
NODE_CONNECT_S = 20.0  # the node starts debugpy in the instance before it answers
MAX_FRAME = 64 * 1024


def _denied(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.code, e.message), status_code=e.status)


async def _checked(
    websocket: WebSocket, caller: Caller | None, app: str
) -> tuple[Instance, Node, float, bool]:
    if caller is None:  # only reachable if the guard were taken away: refuse, never allow
        raise ApiError(401, "unauthorized", "not authenticated")
    if not caller.may("debug"):
        raise ApiError(
            403,
            "forbidden",
            f"attaching a debugger needs the 'debug' permission, which a {caller.role!r} token lacks "
            "(roles that have it: admin, debug); `osless tokens create --role debug` makes one",
        )
    if not caller.sees(app):
        raise ApiError(403, "forbidden", f"this token is limited to app {caller.app!r}")
    q = websocket.query_params
    try:
        timeout_s = float(q.get("timeout", DEFAULT_TIMEOUT_S))
    except ValueError:
        timeout_s = -1.0
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ApiError(400, "invalid_request", f"timeout must be seconds in (0, {MAX_TIMEOUT_S:g}]")
    rotation = q.get("rotation", "leave")
    if rotation not in ("leave", "keep"):
        raise ApiError(400, "invalid_request", "rotation must be leave or keep")
    instance = q.get("instance")
    if instance is not None and re.fullmatch(ID_PATTERN, instance) is None:
        raise ApiError(400, "invalid_request", f"{instance[:100]!r} is not an instance id")
    state: ApiState = websocket.app.state.osless
    inst, node = (await _targets(state, app, instance))[0]
    if not node.api:
        raise ApiError(503, "node_unavailable", f"node {node.name} has no node API to ask")
    return inst, node, timeout_s, rotation == "keep"


async def _record(websocket: WebSocket, caller: Caller | None, method: str, what: str, status: int) -> None:
    state: ApiState = websocket.app.state.osless
    app = websocket.path_params["app"]
    try:
        await audit.record(
            state.resources.store,
            token=caller.id if caller else "",
            name=caller.name if caller else "",
            role=caller.role if caller else "",
            method=method,
            path=cap(f"/v1/apps/{app}/debug/attach {what}", 1000),
            status=status,
            app=app,
            client=websocket.client.host if websocket.client else None,
        )
    except Exception:  # the session goes on: a record lost is logged, as the guard does
        log.exception("could not record a debug session of %s in the audit log", app)


async def _open(
    state: ApiState, app: str, inst: Instance, node: Node, timeout_s: float, keep: bool
) -> ClientConnection:
    token = state.secrets.scoped_token("debugger", app, TOKEN_TTL_S, node.name)
    query = urlencode({"timeout": f"{timeout_s:g}", "rotation": "keep" if keep else "leave"})
    url = (
        "ws"
        + str(node.api).rstrip("/").removeprefix("http")
        + f"/debug/apps/{app}/instances/{inst.id}/attach?{query}"
    )
    try:
        return await connect(
            url,
            additional_headers={"authorization": f"Bearer {token}"},
            max_size=MAX_FRAME,
            open_timeout=NODE_CONNECT_S,
        )
    except InvalidStatus as e:
        status, code, message = _said(e)
        raise ApiError(status, code, f"node {node.name} refused the session: {message}") from None
    except (OSError, TimeoutError, WebSocketException) as e:
        raise ApiError(502, "node_unreachable", f"node {node.name} could not be reached: {e}") from None


def _said(e: InvalidStatus) -> tuple[int, str, str]:
    """The node's refusal as the API's: its status when the caller can act on it (no such instance,
    one attached already, debugpy would not start), else 502; its code and message, capped."""
    status = e.response.status_code
    try:
        error = json.loads(bytes(e.response.body or b""))["error"]
        code, message = cap(str(error["code"]), 64), cap(str(error["message"]), 500)
    except (ValueError, KeyError, TypeError):
        code, message = "node_refused", f"it answered HTTP {status}"
    return (status if status in (404, 409, 503) else 502), code, message


@router.websocket("/apps/{app}/debug/attach")
async def attach(websocket: WebSocket, app: str) -> None:
    state: ApiState = websocket.app.state.osless
    caller: Caller | None = websocket.scope.get("osless.caller")
    try:
        inst, node, timeout_s, keep = await _checked(websocket, caller, app)
    except ApiError as e:
        await _record(websocket, caller, "ATTACH", f"refused: {e.message}", e.status)
        await websocket.send_denial_response(_denied(e))
        return
    what = f"instance {inst.id} on node {node.name}, {timeout_s:g}s, rotation {'kept' if keep else 'left'}"
    try:
        upstream = await _open(state, app, inst, node, timeout_s, keep)
    except ApiError as e:
        await _record(websocket, caller, "ATTACH", f"{what}: {e.message}", e.status)
        await websocket.send_denial_response(_denied(e))
        return
    await _record(websocket, caller, "ATTACH", what, 101)
    started = time.monotonic()
    reason = "ended"
    try:
        await websocket.accept()
        await websocket.send_json(
            {"op": "attached", "instance": inst.id, "node": node.name, "timeout": timeout_s}
        )
        reason = await _relay(websocket, upstream, timeout_s)
    finally:
        await upstream.close()
        with contextlib.suppress(Exception):
            await websocket.send_json({"op": "end", "reason": reason})
            await websocket.close()
        took = time.monotonic() - started
        await _record(websocket, caller, "DETACH", f"{what}: after {took:.0f}s, {reason}", 200)


async def _relay(websocket: WebSocket, upstream: ClientConnection, timeout_s: float) -> str:
    """Binary frames both ways; why it ended."""

    async def up() -> str:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return "the client went"
            data: bytes = msg.get("bytes") or b""
            for at in range(0, len(data), MAX_FRAME):  # a client's larger frame, split
                await upstream.send(data[at : at + MAX_FRAME])

    async def down() -> str:
        try:
            async for frame in upstream:
                if isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
        except ConnectionClosed:
            pass
        said = upstream.close_reason or ""
        return cap(f"the node ended it: {said}" if said else "the node ended it", 200)

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout_s + 5, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return f"the session's time ({timeout_s:g}s) is up"
        try:
            return done.pop().result()
        except (OSError, WebSocketDisconnect, ConnectionClosed, RuntimeError) as e:
            return cap(f"the connection broke: {e}", 200)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
