"""`Api`: the synchronous client of the API, for the CLI, on the standard library's `http.client`.

A CLI command must answer in well under 150 ms, most of which is imports; httpx and httpcore take
~50 ms to import, a third of that budget. The CLI's needs are small (one request at a time, JSON in and
out, NDJSON streams), so this client speaks them with what Python already has loaded. The agents,
the gateway and the controllers keep httpx (`AsyncApi`): they start once and run for days.

Errors are those of `AsyncApi`: ApiError for any non-2xx answer, with the API's code and message;
status 0 with code `unreachable` or `timeout` when the API did not answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

from osless.errors import ApiError

__all__ = ["Api"]

CONNECT_TIMEOUT_S = 5.0
_DEFAULT: Any = object()  # `timeout=None` means "wait as long as it takes"


def _query(params: dict[str, Any] | None) -> str:
    """Query parameters as httpx writes them: booleans as true/false, None left out."""
    return urlencode(
        {
            k: ("true" if v else "false") if isinstance(v, bool) else v
            for k, v in (params or {}).items()
            if v is not None
        }
    )


def _error(status: int, body: bytes) -> ApiError:
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode(errors="replace")
        code, message, err = "http_error", f"HTTP {status}: {text}", {}
    return ApiError(status, code, message, detail=err)


class Api:
    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._parts = urlsplit(self.base_url)
        self._headers = {"authorization": f"Bearer {token}", "user-agent": "osless-cli"}
        self._timeout = timeout

    def _unreachable(self, e: BaseException) -> ApiError:
        """The same words for the same failure as `AsyncApi`'s."""
        if isinstance(e, TimeoutError):
            return ApiError(0, "timeout", f"the API at {self.base_url} did not answer in time: {e}")
        return ApiError(
            0, "unreachable", f"cannot reach the API at {self.base_url} ({e}); is `osless up` running?"
        )

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        body: bytes | BinaryIO | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = self._parts
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(
                0, "unreachable", f"the API address {self.base_url!r} is not an http:// or https:// URL"
            )
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            import ssl  # only for https: its CA bundle takes time to load

            import certifi  # the roots httpx trusts, so that both clients trust the same servers

            # $SSL_CERT_FILE / $SSL_CERT_DIR first, as httpx reads them: an API behind a private CA.
            context = ssl.create_default_context(
                cafile=os.environ.get("SSL_CERT_FILE")
                or (None if os.environ.get("SSL_CERT_DIR") else certifi.where()),
                capath=os.environ.get("SSL_CERT_DIR") or None,
            )
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=CONNECT_TIMEOUT_S, context=context
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT_S)
        query = _query(params)
        target = parts.path + path + (("&" if "?" in path else "?") + query if query else "")
        try:
            conn.connect()
            assert conn.sock is not None  # connected
            conn.sock.settimeout(timeout)  # connected within CONNECT_TIMEOUT_S; now the answer's own bound
            conn.request(method, target, body=body, headers={**self._headers, **headers})
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: Any = _DEFAULT,
    ) -> Any:
        headers = dict(headers or {})
        if json is not None:
            content = _json_dumps(json)
            headers.setdefault("content-type", "application/json")
        try:
            read_timeout = self._timeout if timeout is _DEFAULT else timeout
            conn, resp = self._send(method, path, params, content, headers, read_timeout)
            with contextlib.closing(conn):
                status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from e
        if not 200 <= status < 300:
            raise _error(status, data)
        return None if status == 204 or not data else _json_loads(data)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        if body is not None:
            kw["json"] = body
        return self.request("POST", path, **kw)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def stream(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """NDJSON records of a streaming endpoint, as they arrive (no read timeout: a follow waits)."""
        try:
            conn, resp = self._send("GET", path, params, None, {}, None)
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from e
        with contextlib.closing(conn):
            try:
                if not 200 <= resp.status < 300:
                    raise _error(resp.status, resp.read())
                for line in resp:
                    if line.strip():
                        yield _json_loads(line)
            except (OSError, http.client.HTTPException) as e:
                raise ApiError(0, "unreachable", f"stream from {self.base_url}{path} broke: {e}") from e

    @contextlib.contextmanager
    def raw(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: BinaryIO | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """The answer of a request whose body or answer are bytes (a file), to read as it comes; an
        ApiError if it is not a 2xx. `body` is streamed (give its Content-Length in `headers`)."""
        try:
            conn, resp = self._send(method, path, params, body, dict(headers or {}), None)
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from e
        with contextlib.closing(conn):
            if not 200 <= resp.status < 300:
                raise _error(resp.status, resp.read(64 * 1024))
            yield resp

    def close(self) -> None:
        """Nothing to release: each request has its own connection, closed once answered."""


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _json_loads(data: bytes) -> Any:
    return json.loads(data)
