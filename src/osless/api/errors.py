"""One error shape for every failure: {"error": {"code": ..., "message": ...}}.

ApiError ── raised by routes; carries the HTTP status, a stable code and a message that says
            what is wrong and how to fix it.
ErrorBody ─ that shape as a model, declared once for the OpenAPI document: `responses(404, 409)`
            is what a route decorator lists.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from osless.errors import ApiError
from osless.store import MAX_VALUE_BYTES, Unavailable, ValueTooLarge

__all__ = ["ERROR_REF", "ApiError", "ErrorBody", "error_body", "install_error_handlers", "responses"]

log = logging.getLogger("osless.api")


class ErrorDetail(BaseModel):
    # A function's own error adds its traceback.
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="stable and machine-readable, e.g. app_not_found, stale_revision")
    message: str = Field(description="what is wrong and how to fix it")


class ErrorBody(BaseModel):
    """Every answer of 400 or more."""

    error: ErrorDetail


ERROR_REF = "#/components/schemas/ErrorBody"

# Why each status can be answered, as the OpenAPI document says it.
WHY = {
    400: "Malformed: the body is not JSON, or a value the schema cannot express is wrong",
    401: "No valid bearer token",
    403: "The token's role or app does not allow this",
    404: "No such resource",
    409: "Conflicts with the current state: read it again, or do what the message says first",
    413: "The body is over the limit",
    415: "The body is not of a media type this accepts",
    422: "A value is invalid: the message names it",
    429: "Too many requests for this token: wait for Retry-After",
    500: "An internal error; of a function call, the function's own (function_error, result_not_json)",
    502: "The gateway could not be reached",
    503: "Busy: try again after Retry-After",
    504: "No answer in time",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer `statuses`, each with the one error body.

    The body is given as its media type and schema (not `model=`), so that a route whose success is
    a stream still declares its errors as JSON."""
    return {
        s: {"description": WHY[s], "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}
        for s in statuses
    }


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _describe(errors: list[Any]) -> tuple[str, str, int]:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "malformed_json", "the request body is not valid JSON: " + str(first.get("msg", "")), 400
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid_request", "; ".join(parts), 422


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        code, message, status = _describe(list(exc.errors()))
        return JSONResponse(error_body(code, message), status)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = exc.headers
        if exc.status_code == 404 and message == "Not Found":
            message = "no such path; the API lives under /v1 (see /openapi.json)"
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
            headers["allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; {request.url.path} answers {', '.join(allowed)}"
        return JSONResponse(error_body(code, message), exc.status_code, headers=headers)

    async def value_too_large(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValueTooLarge)
        message = (
            f"this change would make the record {exc.key} {exc.size} bytes, past the limit of "
            f"{MAX_VALUE_BYTES // 1024} KiB per record; nothing was written. "
            "Send less: fewer or shorter values"
        )
        return JSONResponse(error_body("value_too_large", message), 413)

    async def store_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # A write under way may or may not have been applied: the caller reads again, then retries.
        message = f"the state store did not answer in time ({exc}); read the state again, then retry"
        return JSONResponse(error_body("store_unavailable", message), 503, headers={"retry-after": "1"})

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal", f"internal error: {type(exc).__name__}: {exc}"), 500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ValueTooLarge, value_too_large)
    app.add_exception_handler(Unavailable, store_unavailable)
    app.add_exception_handler(Exception, unexpected)


def _allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document gives this path: the router's 405 names only one route's."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    path = request.scope["path"]
    return sorted({m.upper() for t, ops in paths.items() if _template(t).fullmatch(path) for m in ops})


@functools.lru_cache(maxsize=256)
def _template(path: str) -> re.Pattern[str]:
    """/v1/apps/{app} as a pattern: each {parameter} is one path segment."""
    return re.compile(
        "".join(
            "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", path)
        )
    )
