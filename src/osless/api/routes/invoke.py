"""Synchronous function invocation, handed to the gateway, which owns routing to instances."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from osless.api import invocations, wakes
from osless.api.auth import Caller, check_invoke, require
from osless.api.errors import ApiError, responses
from osless.api.models import Release
from osless.api.state import ApiState, get_state
from osless.contracts import FunctionManifest
from osless.sdk import traceparent

router = APIRouter(tags=["functions"])

# What the API holds of one result to answer it: Lambda's own limit on a synchronous answer. A
# function (or a hostile app's instance) answering without end must not take the API's memory.
MAX_RESULT_BYTES = 6 * 1024 * 1024
REQUEST_ID = re.compile(r"[!-~]{1,64}")  # a caller's own id for its call, passed on
INVOCATION_TYPE = "x-osless-invocation-type"
MAX_IDEMPOTENCY_KEY = 200


@router.post(
    "/apps/{app}/functions/{function}:invoke",
    responses={
        200: {"description": "The function's result", "content": {"application/json": {"schema": {}}}},
        202: {"description": "Async (`X-Osless-Invocation-Type: Event`): the invocation, stored durably"},
        # 500: the function raised, or returned what JSON cannot carry (its error, not the platform's)
        **responses(400, 404, 409, 413, 500, 502, 503, 504),
    },
    # The event is read as it comes: any JSON, or nothing (null).
    openapi_extra={"requestBody": {"required": False, "content": {"application/json": {"schema": {}}}}},
    summary="Invoke a function with a JSON event; the answer is the function's JSON result",
    description="With `X-Osless-Invocation-Type: Event` the invocation is asynchronous: the answer (202) "
    "is the invocation (`{id, state: queued, ...}`), once stored durably; `Idempotency-Key` accepts "
    "the same key for the function once within 24 h (the second answer: the first invocation, 200). "
    "Its state: `GET /v1/invocations/{id}`.",
)
async def invoke(
    app: str,
    function: str,
    request: Request,
    state: ApiState = Depends(get_state),
    caller: Caller = require("invoke"),
) -> Response:
    await check_invoke(state.resources.store, caller, app, function)
    _, spec = await find_function(state, app, function)
    kind = request.headers.get(INVOCATION_TYPE, "RequestResponse")
    if kind == "Event":
        found, new = await enqueue(state, app, function, await request.body(), request.headers)
        return JSONResponse(found, 202 if new else 200)
    if kind != "RequestResponse":
        raise ApiError(
            400, "bad_invocation_type", f"{INVOCATION_TYPE} {kind[:40]!r}: give Event or RequestResponse"
        )
    resp = await call_function(state, app, function, spec, await request.body(), request.headers)
    keep = {
        k: v for k, v in resp.headers.items() if k in ("content-type", "x-osless-request-id", "retry-after")
    }
    return Response(resp.content, resp.status_code, headers=keep)


async def enqueue(
    state: ApiState, app: str, function: str, body: bytes, request_headers: Mapping[str, str]
) -> tuple[dict[str, object], bool]:
    """An async invocation stored durably (see api/invocations.py); whether it is new. Shared with
    the Lambda Invoke API (InvocationType Event)."""
    if state.broker is None:
        raise ApiError(
            503, "no_message_engine", "async invocations need the message engine, not connected yet"
        )
    if len(body) > invocations.MAX_EVENT_BYTES:
        raise ApiError(
            413,
            "event_too_large",
            f"an async invocation's event is at most {invocations.MAX_EVENT_BYTES // 1024} KiB "
            f"(this one: {len(body)} bytes); pass a reference to the data instead",
        )
    try:  # UTF-8 JSON: json.loads would take bytes in UTF-16 or 32 too, which the event is stored as
        json.loads((body or b"null").decode())
    except ValueError as e:  # UnicodeDecodeError is one
        raise ApiError(400, "malformed_json", f"the event must be JSON in UTF-8: {e}") from e
    key = request_headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            400, "bad_idempotency_key", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )
    trace = request_headers.get("traceparent", "")
    if key is not None:
        # The engine keeps a key's id 24 h, past a delete of the app: scoped by the app's uid (never
        # reused), a new app of the name runs its own, not taken for the old one's (and never run).
        key = f"{(await state.resources.get_app(app)).uid}\0{key}"
    wakes.wake_soon(state, app, "an async invocation arrived while at zero")
    return await invocations.submit(state.broker, app, function, body or b"null", key, trace)


async def find_function(state: ApiState, app: str, function: str) -> tuple[Release, FunctionManifest]:
    """The app's current release and the function's spec in it; 409 or 404 saying what is missing.
    Shared with the Lambda Invoke API (routes/lambda_invoke.py)."""
    a = await state.resources.get_app(app)
    if a.current_release is None:
        raise ApiError(409, "not_deployed", f"app {app!r} has no release yet; `osless deploy` it first")
    release = await state.resources.get_release(app, a.current_release)
    functions = release.manifest.functions
    if function not in functions:
        names = ", ".join(sorted(functions)) or "none"
        raise ApiError(404, "unknown_function", f"app {app!r} has no function {function!r} (it has: {names})")
    return release, functions[function]


async def call_function(
    state: ApiState,
    app: str,
    function: str,
    spec: FunctionManifest,
    body: bytes,
    request_headers: Mapping[str, str],
) -> httpx.Response:
    """The function called with the JSON `body` through a gateway: the gateway's answer, whatever
    its status (the function's own errors are 500s). Shared with the Lambda Invoke API."""
    try:
        json.loads(body or b"null")
    except ValueError as e:
        raise ApiError(400, "malformed_json", f"the event must be JSON: {e}") from e
    timeout = float(spec.timeout_s) + 10
    # The gateway is shown a token that invokes this app for a while, never the caller's own: the
    # gateway may be on a node taken over, which would otherwise collect the tokens of whoever invokes.
    invoker = state.secrets.scoped_token("invoker", app, timeout + 60)
    headers = {"content-type": "application/json", "authorization": f"Bearer {invoker}"}
    rid = request_headers.get("x-osless-request-id", "")[:64]
    if REQUEST_ID.fullmatch(rid):  # visible ASCII: httpx sends no other header value
        headers["x-osless-request-id"] = rid
    trace = request_headers.get("traceparent", "")
    if traceparent.valid(trace.encode("latin-1", "replace")):  # else the gateway starts a trace
        headers["traceparent"] = trace
    url = f"{state.gateway_url}/_functions/{app}/{function}"
    try:
        async with state.http.stream("POST", url, content=body, headers=headers, timeout=timeout) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():  # decoded: a compressed answer is counted whole
                size += len(chunk)
                if size > MAX_RESULT_BYTES:  # the connection is closed, not read to its end
                    raise ApiError(
                        502,
                        "result_too_large",
                        f"the answer of {app}.{function} is over the {MAX_RESULT_BYTES // (1024 * 1024)} "
                        "MiB limit on a function's result: return less, or a reference to it "
                        "(a URL, a volume path)",
                    )
                chunks.append(chunk)
        kept = [(k, v) for k, v in resp.headers.items() if k not in ("content-encoding", "content-length")]
        return httpx.Response(resp.status_code, headers=kept, content=b"".join(chunks))
    except httpx.TimeoutException as e:
        raise ApiError(504, "timeout", f"no answer from {app}.{function} within {timeout:.0f}s") from e
    except httpx.TransportError as e:
        raise ApiError(
            502, "gateway_unreachable", f"cannot reach the gateway at {state.gateway_url}: {e}"
        ) from e
