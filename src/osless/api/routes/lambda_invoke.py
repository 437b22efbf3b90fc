"""AWS Lambda's Invoke API, so boto3's `lambda` client (`endpoint_url=` the API) calls functions.

`POST /2015-03-31/functions/{name}/invocations`, `name` being `APP.FUNCTION` (or an ARN ending in
it, or either with `:QUALIFIER`). The call itself is the invoke route's (routes/invoke.py: the same
checks, gateway and scoped token); this route reads Lambda's request and answers in Lambda's shapes.
How the caller's token travels, and the error shape: api/awslambda.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute

from osless.api import awslambda
from osless.api.auth import Caller, check_invoke, check_scope, require
from osless.api.errors import ApiError
from osless.api.models import Release
from osless.api.routes.invoke import call_function, enqueue, find_function
from osless.api.state import ApiState, get_state
from osless.contracts import APP_NAME_PATTERN, FUNCTION_NAME_PATTERN

__all__ = ["router"]

# A function's own failure, as the instance or the gateway reports it: (status, code) -> errorType.
FUNCTION_ERRORS = {
    (500, "result_not_json"): "Runtime.MarshalError",
    (504, "timeout"): "Sandbox.Timedout",
    (502, "instance_exited"): "Runtime.ExitError",
    (502, "result_too_large"): "Function.ResponseSizeTooLarge",
}
LATEST = "$LATEST"
QUALIFIER = re.compile(r"[A-Za-z0-9$_-]{1,128}")  # Lambda's own: a version or an alias
_FRAME = re.compile(r"  File .*\n(?:    .*\n)*")


class LambdaRoute(APIRoute):
    """Errors answered in Lambda's shape (botocore raises them by name), those of the route's
    dependencies (the permission check) included."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                headers, body = awslambda.error(e.status, e.code, e.message)
                response = Response(body, e.status)
                response.headers.update({k.decode(): v.decode() for k, v in headers})
                response.headers.update(e.headers or {})
                return response

        return handle


router = APIRouter(tags=["lambda"], route_class=LambdaRoute)


@router.post(f"{awslambda.PREFIX}functions/{{name}}/invocations", include_in_schema=False)
async def invoke(
    name: str,
    request: Request,
    state: ApiState = Depends(get_state),
    # Checked below against the app the name holds, as `require` does for an `{app}` in a path.
    caller: Caller = require("invoke", narrows=True),
) -> Response:
    app, function, qualifier = _target(name, request.query_params.get("Qualifier"))
    check_scope(caller, app)
    request.scope["path_params"]["app"] = app  # the audit names the app, as for /v1/apps/{app}/...
    await check_invoke(state.resources.store, caller, app, function)
    release, spec = await find_function(state, app, function)
    if qualifier not in (None, LATEST, str(release.version)):
        raise ApiError(
            404,
            "unknown_version",
            f"{app}.{function}:{qualifier} is not served: osless runs an app's current release only "
            f"(now {release.version}); give Qualifier {LATEST} or {release.version}, or none",
        )
    kind = request.headers.get("x-amz-invocation-type", "RequestResponse")
    if kind == "DryRun":  # every check passed: Lambda's answer to a dry run
        return Response(status_code=204, headers={"x-amz-executed-version": str(release.version)})
    if kind == "Event":  # Lambda's answer: 202, no body; the state is at GET /v1/invocations/{id}
        found, _ = await enqueue(state, app, function, await request.body(), request.headers)
        return Response(
            status_code=202,
            headers={
                "x-amz-executed-version": str(release.version),
                "x-osless-invocation-id": str(found["id"]),
            },
        )
    if kind != "RequestResponse":
        raise ApiError(400, "bad_invocation_type", f"InvocationType {kind[:40]!r} is not one of Lambda's")
    try:
        resp = await call_function(state, app, function, spec, await request.body(), request.headers)
    except ApiError as e:
        if e.code != "result_too_large":
            raise
        # The function ran: its failure, as Lambda says it (a 5xx would have boto3 run it again).
        resp = httpx.Response(e.status, json={"error": {"code": e.code, "message": e.message}})
    return _answer(resp, release)


def _target(name: str, query: str | None) -> tuple[str, str, str | None]:
    """(app, function, qualifier) of a FunctionName: `APP.FUNCTION`, an ARN ending in it, either
    followed by `:QUALIFIER`; the `Qualifier` query, if given too, must agree."""
    parts = name.split(":")
    if parts[0] == "arn":
        if len(parts) not in (7, 8) or parts[2] != "lambda" or parts[5] != "function":
            raise ApiError(404, "unknown_function", f"{name[:200]!r} is not a Lambda function ARN")
        parts = parts[6:]
    if len(parts) > 2:
        raise ApiError(404, "unknown_function", f"{name[:200]!r} is not a function name")
    qualifier = parts[1] if len(parts) == 2 else None
    for given in (qualifier, query):
        if given is not None and not QUALIFIER.fullmatch(given):
            raise ApiError(
                400,
                "bad_qualifier",
                f"Qualifier {given[:40]!r} is not a version or an alias (letters, digits, $, _ and -, "
                f"at most 128): give {LATEST}, the release's number, or none",
            )
    if query is not None and qualifier is not None and query != qualifier:
        raise ApiError(400, "bad_qualifier", f"the name says {qualifier!r} and Qualifier says {query!r}")
    app, _, function = parts[0].partition(".")
    if not re.fullmatch(APP_NAME_PATTERN, app) or not re.fullmatch(FUNCTION_NAME_PATTERN, function):
        raise ApiError(
            404,
            "unknown_function",
            f"no function named {parts[0][:200]!r}: osless names functions APP.FUNCTION, e.g. shop.quote",
        )
    return app, function, query if query is not None else qualifier


def _answer(resp: httpx.Response, release: Release) -> Response:
    """The gateway's answer as Lambda gives it: a result, or the function's own failure as a 200
    with `X-Amz-Function-Error: Unhandled`; the platform's errors in Lambda's error shape."""
    executed = resp.headers.get("x-osless-release", "")  # the release of the instance that ran it
    headers = {
        "content-type": "application/json",
        "x-amz-executed-version": executed if executed.isdigit() else str(release.version),
    }
    if rid := resp.headers.get("x-osless-request-id"):
        headers["x-amzn-requestid"] = rid
    if resp.status_code == 200:
        return Response(resp.content, 200, headers=headers)
    try:
        error = json.loads(resp.content)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        error, code, message = {}, "bad_gateway", f"the gateway answered {resp.status_code} without an error"
    if code == "bad_gateway" and "failed before answering" in message:
        # The instance died with the call in it (out of memory, os._exit): the function ran, so it is
        # its failure, as Lambda says it; a 5xx would have boto3 run it again, up to 4 times.
        code = "instance_exited"
    if code == "function_error" or (resp.status_code, code) in FUNCTION_ERRORS:
        kind = str(error.get("type") or FUNCTION_ERRORS.get((resp.status_code, code), "Exception"))
        text = message[len(kind) + 2 :] if message.startswith(f"{kind}: ") else message
        payload = {
            "errorMessage": "" if text == kind else text,
            "errorType": kind,
            "requestId": headers.get("x-amzn-requestid", ""),
            "stackTrace": _FRAME.findall(str(error.get("traceback") or "")),
        }
        headers["x-amz-function-error"] = "Unhandled"
        return Response(json.dumps(payload).encode(), 200, headers=headers)
    retry = {"retry-after": resp.headers["retry-after"]} if "retry-after" in resp.headers else None
    raise ApiError(resp.status_code, code, message, headers=retry)
