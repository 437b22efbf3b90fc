"""What the Lambda Invoke API (routes/lambda_invoke.py) shares with the guard: where its paths are,
where its caller's token travels, and Lambda's error shape.

The token: boto3 signs each request with SigV4, an HMAC keyed by the secret access key. The API
keeps tokens by digest only, so it cannot check an HMAC keyed by one. The osless token is therefore
boto3's session token (`aws_session_token`), which botocore sends in clear as `X-Amz-Security-Token`,
and it is checked exactly as a bearer token is (api/guard.py); the access key id and the secret may
be anything, and the signature is not checked: the token is the credential, as a bearer token is.

Errors: botocore takes an error's name from the `x-amzn-ErrorType` header and its text from the
body's `message`, and raises `client.exceptions.<name>`. The body also holds osless's own
`{"error": {"code", "message"}}`, so either kind of client reads it.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import Scope

__all__ = ["MISSING", "PREFIX", "error", "error_type", "is_lambda", "token_of"]

PREFIX = "/2015-03-31/"  # the Invoke API's version, in every one of its paths
MISSING = (
    "missing token: pass an osless token (role invoke, deploy or admin) as boto3's aws_session_token "
    "(sent as X-Amz-Security-Token), or send 'Authorization: Bearer <token>'"
)
_BY_CODE = {
    "unauthorized": "UnrecognizedClientException",
    "token_expired": "UnrecognizedClientException",
    "malformed_json": "InvalidRequestContentException",
}
_BY_STATUS = {
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    409: "ResourceConflictException",
    413: "RequestTooLargeException",
    415: "UnsupportedMediaTypeException",
    429: "TooManyRequestsException",
}


def is_lambda(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith(PREFIX)


def token_of(scope: Scope) -> str:
    """The token a Lambda API caller sent beside its signature ("" if none, or not a Lambda path)."""
    if not is_lambda(scope):
        return ""
    return Headers(scope=scope).get("x-amz-security-token", "").strip()


def error_type(status: int, code: str) -> str:
    """Lambda's name for an error of osless's `status` and `code`."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return "ServiceException" if status >= 500 else "InvalidParameterValueException"


def error(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of an error answer as Lambda shapes it (and osless's inside)."""
    kind = error_type(status, code)
    body = {
        "Type": "Service" if status >= 500 else "User",
        "message": message,
        "error": {"code": code, "message": message},
    }
    headers = [(b"content-type", b"application/json"), (b"x-amzn-errortype", kind.encode("ascii"))]
    return headers, json.dumps(body).encode()
