"""HTTP requests as AWS Lambda Function URL events, and a handler's answer as the HTTP answer.

A function declared with `@app.function(http=True)` gets each HTTP request as the event an API
Gateway HTTP API or a Lambda Function URL sends (payload format 2.0), and answers as it would there:
`{"statusCode", "headers", "body", "isBase64Encoded", "cookies"}`, or any other JSON value, which
becomes a 200 JSON answer. Pure functions: the instance (`runtime.instance`) reads the request and
runs the handler.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["Answer", "BadAnswer", "answer_of", "event_of"]

# Bodies of these types reach the handler as text; any other (or text that is not UTF-8) in base64,
# as Function URLs do.
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "application/x-www-")
TEXT_SUFFIXES = ("+json", "+xml")
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP field name (RFC 9110 5.1)
# Set by the server from the body it sends, never by the handler.
NOT_FROM_HANDLER = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BadAnswer(ValueError):
    """The handler's answer cannot be an HTTP answer; the message says why."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def event_of(
    *,
    method: str,
    raw_path: str,
    query: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    http_version: str,
    source_ip: str,
    request_id: str,
    app: str,
    now: float,
) -> dict[str, Any]:
    """The payload format 2.0 event of one request. `raw_path` is the path under the function's own
    root (`/{app}` or `/{app}/_http/{fn}` taken off), as a Function URL's is under its domain."""
    joined: dict[str, str] = {}
    cookies: list[str] = []
    for raw_name, raw_value in headers:
        key, text = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if key == "cookie":
            cookies += [c.strip() for c in text.split(";") if c.strip()]
        else:
            joined[key] = f"{joined[key]},{text}" if key in joined else text
    raw_query = query.decode("latin-1")
    params: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        params[key] = f"{params[key]},{value}" if key in params else value
    host = joined.get("host", "")
    t = time.gmtime(now)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": raw_query,
        "headers": joined,
        "requestContext": {
            "accountId": "anonymous",  # what a Function URL with auth NONE says
            "apiId": app,
            "domainName": host,
            "domainPrefix": host.split(".", 1)[0],
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": f"HTTP/{http_version}",
                "sourceIp": source_ip,
                "userAgent": joined.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime(f"%d/{_MONTHS[t.tm_mon - 1]}/%Y:%H:%M:%S +0000", t),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    # Absent when empty, as a Function URL sends them: handlers written for it read them with .get().
    if cookies:
        event["cookies"] = cookies
    if params:
        event["queryStringParameters"] = params
    if body:
        as_text = _as_text(body, joined.get("content-type", ""))
        event["body"] = as_text if as_text is not None else base64.b64encode(body).decode("ascii")
        event["isBase64Encoded"] = as_text is None
    return event


def _as_text(body: bytes, content_type: str) -> str | None:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind and not kind.startswith(TEXT_TYPES) and not kind.endswith(TEXT_SUFFIXES):
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def answer_of(result: Any) -> Answer:
    """The HTTP answer a handler's result stands for. A dict with a statusCode says it whole; any
    other value is the body of a 200 JSON answer (a string as it is, anything else as JSON)."""
    if not isinstance(result, Mapping) or "statusCode" not in result:
        body = result if isinstance(result, str) else _json(result)
        return Answer(200, [(b"content-type", b"application/json")], body.encode("utf-8"))
    status = result["statusCode"]
    # Not str.isdigit(): it holds for '²' (which int() refuses) and for digits past int()'s limit.
    if isinstance(status, str) and re.fullmatch(r"[0-9]{1,3}", status):
        status = int(status)
    # No 1xx: an interim answer is the server's to send, never a final one.
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise BadAnswer(f"statusCode {str(status)[:20]!r} is not a final HTTP status (200 to 599)")
    headers: list[tuple[bytes, bytes]] = []
    given = result.get("headers") or {}
    if not isinstance(given, Mapping):
        raise BadAnswer("headers must be an object of names to values")
    for name, value in given.items():
        if not isinstance(name, str) or not TOKEN.fullmatch(name):
            raise BadAnswer(f"header name {str(name)[:50]!r} is not an HTTP field name")
        if name.lower() in NOT_FROM_HANDLER:
            continue
        headers.append((name.lower().encode("ascii"), _field(f"header {name}", _scalar(name, value))))
    cookies = result.get("cookies") or []
    if not isinstance(cookies, list) or not all(isinstance(c, str) for c in cookies):
        raise BadAnswer("cookies must be a list of Set-Cookie strings")
    headers += [(b"set-cookie", _field("a cookie", c)) for c in cookies]
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"application/json"))  # what a Function URL assumes
    given_body = result.get("body")
    if given_body is None:
        data = b""
    elif not isinstance(given_body, str):
        kind = type(given_body).__name__
        raise BadAnswer(f"body is a {kind}, not a string: return json.dumps(...) of it")
    elif result.get("isBase64Encoded") is True:
        try:
            data = base64.b64decode(given_body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadAnswer(f"isBase64Encoded is true but the body is not base64: {e}") from None
    else:
        data = given_body.encode("utf-8")
    if status in (204, 304):
        data = b""  # these have no body: bytes after their head would be read as the next answer
    return Answer(status, headers, data)


def _json(result: Any) -> str:
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BadAnswer(f"the result is not JSON-serialisable ({e})") from None


def _scalar(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise BadAnswer(f"header {name}'s value is a {type(value).__name__}: give a string")


def _field(what: str, value: str) -> bytes:
    if any(c in value for c in "\r\n\0"):  # would end the header and start another: refused, never cut
        raise BadAnswer(f"{what} holds a line break or NUL")
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise BadAnswer(f"{what} holds characters HTTP headers cannot carry (Latin-1 only)") from None
