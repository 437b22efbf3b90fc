"""One error shape for every failure: {"error": {"code": ..., "message": ...}}.

ApiError ── raised by routes; carries the HTTP status, a stable code and a message that says
            what is wrong and how to fix it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from osless.store import MAX_VALUE_BYTES, ValueTooLarge

__all__ = ["ApiError", "error_body", "install_error_handlers"]

log = logging.getLogger("osless.api")


class ApiError(Exception):
    """An expected failure, answered with `status` and a JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


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

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such path; the API lives under /v1 (see /openapi.json)"
        return JSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)

    async def value_too_large(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValueTooLarge)
        message = (
            f"this change would make the record {exc.key} {exc.size} bytes, past the limit of "
            f"{MAX_VALUE_BYTES // 1024} KiB per record; nothing was written. "
            "Send less: fewer or shorter values"
        )
        return JSONResponse(error_body("value_too_large", message), 413)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal", f"internal error: {type(exc).__name__}: {exc}"), 500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ValueTooLarge, value_too_large)
    app.add_exception_handler(Exception, unexpected)
