"""`WS /v1/apps/{app}/runs`: a one-off command in a fresh sandbox of the app's release (`osless run`).

Refused before the websocket opens, with the one error body and its status: 403 without the
`deploy` permission (or for another app), 404 no such app, 409 no release, 400 a bad `release` or
`timeout`, 429 past the runs an app may have at once. Once open, the CLI's first frame
names the command; frames then pass both ways between the CLI and the node (`runwire`, `api.runs`).
Each run is audited (who ran what, in which app) as it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from osless import runwire
from osless.api import audit
from osless.api.auth import Caller
from osless.api.errors import ApiError, error_body
from osless.api.runs import NodeRun, Target, check_room, target
from osless.api.state import ApiState

router = APIRouter(tags=["runs"])

log = logging.getLogger("osless.api.runs")

START_TIMEOUT_S = 10.0  # for the CLI's first frame


def _denied(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.code, e.message), status_code=e.status)


async def _checked(websocket: WebSocket, app: str) -> tuple[Caller, Target, float]:
    caller: Caller | None = websocket.scope.get("osless.caller")
    if caller is None:  # only reachable if the guard were taken away: refuse, never allow
        raise ApiError(401, "unauthorized", "not authenticated")
    if not caller.may("deploy"):
        raise ApiError(
            403,
            "forbidden",
            f"running a command needs the 'deploy' permission, which a {caller.role!r} token lacks "
            "(roles that have it: admin, deploy); `osless tokens create --role ROLE` makes one",
        )
    if not caller.sees(app):
        raise ApiError(403, "forbidden", f"this token is limited to app {caller.app!r}")
    q = websocket.query_params
    release: int | None = None
    if q.get("release") is not None:
        raw = q["release"]
        if not (raw.isascii() and raw.isdigit() and 0 < int(raw) < 10**9):
            raise ApiError(400, "invalid_request", f"release must be a release number, not {raw[:20]!r}")
        release = int(raw)
    timeout_s = runwire.DEFAULT_TIMEOUT_S
    if q.get("timeout") is not None:
        try:
            timeout_s = float(q["timeout"])
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= runwire.MAX_TIMEOUT_S:
            raise ApiError(
                400, "invalid_request", f"timeout must be seconds in (0, {runwire.MAX_TIMEOUT_S:g}]"
            )
    state: ApiState = websocket.app.state.osless
    tgt = await target(state, app, release)
    await check_room(state, app)
    return caller, tgt, timeout_s


@router.websocket("/apps/{app}/runs")
async def run(websocket: WebSocket, app: str) -> None:
    state: ApiState = websocket.app.state.osless
    try:
        caller, tgt, timeout_s = await _checked(websocket, app)
    except ApiError as e:
        await websocket.send_denial_response(_denied(e))
        return
    await websocket.accept()
    try:
        first = await asyncio.wait_for(websocket.receive_json(), START_TIMEOUT_S)
        command = first.get("command") if isinstance(first, dict) else None
        tty = runwire.tty_size(first.get("tty")) if isinstance(first, dict) else None
    except (TimeoutError, ValueError, KeyError, WebSocketDisconnect):  # KeyError: a binary frame
        command, tty = None, None
    problem = runwire.command_problem(command)
    if problem or not isinstance(command, list):
        await _end(websocket, {"op": "error", "code": "invalid_request", "message": problem or "no command"})
        return
    client = websocket.client.host if websocket.client else None
    try:
        await audit.record(
            state.resources.store,
            token=caller.id,
            name=caller.name,
            role=caller.role,
            method="RUN",
            path=f"/v1/apps/{app}/runs v{tgt.release}: {runwire.shown(command)}",
            status=101,
            app=app,
            client=client,
        )
    except Exception:  # the run goes on: a record lost is logged, as the guard does
        log.exception("could not record a run of %s in the audit log", app)
    try:
        async with NodeRun(state, tgt, command, timeout_s, tty) as node_run:
            await _relay(websocket, node_run)
    except ApiError as e:
        await _end(websocket, {"op": "error", "code": e.code, "message": e.message})


async def _relay(websocket: WebSocket, node_run: NodeRun) -> None:
    async def incoming() -> None:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data, text = msg.get("bytes"), msg.get("text")
            if data and data[0] == runwire.STDIN:
                await node_run.send_stdin(data[1 : 1 + runwire.MAX_CHUNK])
            elif text is not None:
                op, msg_ = _message(text)
                if op in ("eof", "stop"):
                    await node_run.send_op(op)
                elif op == "resize" and (size := runwire.tty_size(msg_)) is not None:
                    await node_run.send_op("resize", rows=size[0], cols=size[1])
                if op == "stop":
                    return

    async def outgoing() -> dict[str, Any]:
        async for frame in node_run.frames():
            if isinstance(frame, dict):
                return frame
            tag, data = frame
            await websocket.send_bytes(bytes([tag]) + data)
        return {"op": "error", "code": "node_lost", "message": "the node went before the command ended"}

    in_task = asyncio.create_task(incoming())
    out_task = asyncio.create_task(outgoing())
    try:
        done, _ = await asyncio.wait({in_task, out_task}, return_when=asyncio.FIRST_COMPLETED)
        if out_task in done:
            await _end(websocket, out_task.result())
        else:  # the CLI went, or asked to stop: the node ends the command
            await node_run.send_op("stop")
            with contextlib.suppress(TimeoutError):
                last = await asyncio.wait_for(out_task, 5)
                await _end(websocket, last)
    finally:
        for task in (in_task, out_task):
            task.cancel()
        await asyncio.gather(in_task, out_task, return_exceptions=True)


def _message(text: str) -> tuple[str | None, dict[str, Any]]:
    with contextlib.suppress(ValueError):
        msg = json.loads(text)
        if isinstance(msg, dict) and isinstance(msg.get("op"), str):
            return str(msg["op"]), msg
    return None, {}


async def _end(websocket: WebSocket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_json(msg)
        await websocket.close()
