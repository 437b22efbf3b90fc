"""The one error the platform's HTTP API speaks, on both sides of it.

ApiError ── an answer of 400 or more (or no answer: status 0 on the client's side), with the
            status, a stable machine-readable code and a message that says what to do; on the
            wire always `{"error": {"code": ..., "message": ..., ...}}`. The API raises it to
            answer; its client raises it for each such answer, so callers catch one type.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answer of the API (status 0: the API could not be reached or did not answer)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers  # what the answer carries besides its body (Retry-After, Allow...)
        self.detail = detail or {}  # the whole error object as received, e.g. a function's traceback
