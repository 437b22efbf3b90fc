"""HTTP clients of the API: `AsyncApi` (for agents and controllers) and `Api` (sync, for the CLI: in
`osless.client.sync`, on the standard library, so that a command does not import httpx).

ApiError (`osless.errors`, the same class the API raises) ── any non-2xx answer, with the status,
            the stable error code and the message; status 0 when the API could not be reached.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from osless.client.sync import Api
from osless.errors import ApiError

__all__ = ["Api", "ApiError", "AsyncApi"]


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message, err = "http_error", f"HTTP {resp.status_code}: {resp.text[:200]}", {}
    raise ApiError(resp.status_code, code, message, detail=err)


def _transport_error(e: httpx.TransportError, base_url: str) -> ApiError:
    """The same words for the same failure, whichever client met it."""
    if isinstance(e, httpx.TimeoutException):
        return ApiError(0, "timeout", f"the API at {base_url} did not answer in time: {e}")
    return ApiError(0, "unreachable", f"cannot reach the API at {base_url} ({e}); is `osless up` running?")


def _verify(base_url: str) -> bool:
    # Loading the CA bundle costs ~0.3 s per client; plain-http URLs never use it.
    return base_url.startswith("https://")


def _body(resp: httpx.Response) -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


class AsyncApi:
    def __init__(
        self, base_url: str, token: str, *, timeout: float = 30.0, local_address: str | None = None
    ) -> None:
        """`local_address`: the source address of its connections (a node's own: the API ties the
        URLs a node reports to the address it calls from)."""
        self.base_url = base_url.rstrip("/")
        self._made_with = (token, timeout, local_address)
        verify = _verify(self.base_url)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {token}"},
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=httpx.AsyncHTTPTransport(verify=verify, local_address=local_address)
            if local_address
            else None,
        )

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._client.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.base_url) from e
        _raise_for(resp)
        return _body(resp)

    def clone(self) -> AsyncApi:
        """Another client like this one, with a connection pool of its own: for calls that may
        wait long (an app's function call), which must not hold up this one's."""
        token, timeout, local_address = self._made_with
        return AsyncApi(self.base_url, token, timeout=timeout, local_address=local_address)

    async def send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The answer as it is, whatever its status (`ApiError` only when the API cannot be reached):
        for a caller that hands the API's answer on."""
        try:
            return await self._client.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _transport_error(e, self.base_url) from e

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params)

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, json=body)

    async def put(self, path: str, body: Any) -> Any:
        return await self.request("PUT", path, json=body)

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def stream(self, path: str, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """NDJSON records of a streaming endpoint, as they arrive."""
        try:
            async with self._client.stream(
                "GET", path, params=params, timeout=httpx.Timeout(None, connect=5.0)
            ) as r:
                if not r.is_success:
                    await r.aread()
                    _raise_for(r)
                async for line in r.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise ApiError(0, "unreachable", f"stream from {self.base_url}{path} broke: {e}") from e

    async def download(self, path: str) -> AsyncIterator[bytes]:
        """The raw bytes of a GET, in pieces as they arrive (the caller bounds how many it reads)."""
        try:
            async with self._client.stream("GET", path) as r:
                if not r.is_success:
                    await r.aread()
                    _raise_for(r)
                async for chunk in r.aiter_bytes():
                    yield chunk
        except httpx.TransportError as e:
            raise ApiError(0, "unreachable", f"download of {self.base_url}{path} broke: {e}") from e

    async def aclose(self) -> None:
        await self._client.aclose()
