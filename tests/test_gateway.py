"""Web traffic through the gateway: ASGI and WSGI apps, path and host routing, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest

from osless.gateway.http import ClientConnection, Request
from osless.gateway.upstream import Upstream, UpstreamConn
from tests.platform import Platform, recv_until

APPS = Path(__file__).parent / "apps"


def test_asgi_app_by_path_and_by_host(platform: Platform, hello: dict[str, object]) -> None:
    r = httpx.get(f"{platform.gateway}/hello/")
    assert r.status_code == 200 and r.text == "Hello from osless!\n"
    r = httpx.get(f"{platform.gateway}/hello/echo", params={"x": "1"})
    # the prefix the gateway strips is the app's root_path, so the app can build its own URLs
    assert r.json() == {"path": "/hello/echo", "query": {"x": "1"}, "root_path": "/hello"}
    r = httpx.get(f"{platform.gateway}/echo", params={"x": "2"}, headers={"host": "hello.localhost"})
    assert r.json() == {"path": "/echo", "query": {"x": "2"}, "root_path": ""}


def test_wsgi_flask_app(platform: Platform, flask_demo: dict[str, object]) -> None:
    r = httpx.get(f"{platform.gateway}/flask-demo/")
    assert r.status_code == 200 and r.text == "Hello from Flask on osless!\n"
    r = httpx.post(f"{platform.gateway}/flask-demo/echo", json={"a": [1, 2]})
    assert r.json() == {"path": "/echo", "received": {"a": [1, 2]}}


def test_large_bodies_stream_both_ways(platform: Platform, flask_demo: dict[str, object]) -> None:
    payload = b"x" * (3 * 1024 * 1024)
    r = httpx.post(
        f"{platform.gateway}/flask-demo/echo",
        content=payload,
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 200  # a 3 MiB upload passes through; flask sees non-JSON and answers null
    assert r.json()["received"] is None


def test_unknown_app_is_a_json_404(platform: Platform) -> None:
    r = httpx.get(f"{platform.gateway}/no-such-app/")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "app_not_found"


def test_function_invoke_over_the_gateway_needs_a_token(platform: Platform, hello: dict[str, object]) -> None:
    url = f"{platform.gateway}/_functions/hello/greet"
    assert httpx.post(url, json={"name": "x"}).status_code == 401
    r = httpx.post(url, json={"name": "Lin"}, headers={"authorization": f"Bearer {platform.token}"})
    assert r.status_code == 200 and r.json()["message"] == "Hello, Lin!"


def test_internal_paths_never_reach_an_instance(platform: Platform, hello: dict[str, object]) -> None:
    """Finding 1: the instance's own endpoints answered anyone through the gateway, with no token."""
    functions_only = platform.deploy_warm(APPS / "runtime_functions")["app"]
    for app in ("hello", functions_only):
        for path in ("/__osless__/invoke/greet", "/__osless__/invoke/ping", "/__osless__/health"):
            for r in (
                httpx.post(f"{platform.gateway}/{app}{path}", json={"name": "x"}),
                httpx.post(f"{platform.gateway}{path}", json={}, headers={"host": f"{app}.localhost"}),
            ):
                assert r.status_code == 404, (app, path, r.text)
                assert r.json()["error"]["code"] == "not_found"
    # The platform's endpoints are not on the web socket either, whatever the path.
    for path in ("/invoke/ping", "/health"):
        r = httpx.post(f"{platform.gateway}/{functions_only}{path}", json={})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "no_web_app")
    # Through the platform's own way, with a token, the function answers.
    assert platform.invoke(functions_only, "ping") == (200, "pong")


def test_names_strangers_make_up_do_not_grow_the_traffic_figures(platform: Platform) -> None:
    """Finding 14: every unknown app name requested became an entry of /v1/stats."""
    seen: set[str] = set()
    with httpx.Client(base_url=platform.gateway) as client:
        n = 0
        until = time.monotonic() + 3  # three reports' worth, each read as it arrives
        while time.monotonic() < until:
            n += 1
            assert client.get(f"/made-up-{n}/").status_code == 404
            assert client.get("/", headers={"host": f"also-made-up-{n}.localhost"}).status_code == 404
            if n % 20 == 0:
                seen.update(platform.http("GET", "/v1/stats").json()["apps"])
    assert not [name for name in seen if "made-up" in name], sorted(seen)[:5]


def test_timeouts_are_504_and_streams_arrive_as_they_are_sent(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_slow")
    r = httpx.get(f"{platform.gateway}/slow/", timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    r = platform.cli("invoke", "slow.nap", "3", check=False)
    assert r.returncode == 1 and "did not finish within 1s" in r.stderr
    assert json.loads(platform.cli("invoke", "slow.nap", "0.1").stdout) == "rested"

    arrivals = []
    with httpx.stream("GET", f"{platform.gateway}/slow/stream", timeout=10) as resp:
        for line in resp.iter_lines():
            arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals] == [f"chunk {i}" for i in range(5)]
    assert arrivals[-1][0] - arrivals[0][0] > 0.6  # streamed, not buffered until the end

    # Never silent for a second, but no request outlives max_duration_s (2 s): neither a stream...
    t0, ticks = time.monotonic(), 0
    forever = httpx.stream("GET", f"{platform.gateway}/slow/forever", timeout=10)
    # cut short: the chunked answer never ends
    with pytest.raises(httpx.RemoteProtocolError), forever as resp:
        for _ in resp.iter_lines():
            ticks += 1
    assert 1.5 < time.monotonic() - t0 < 5 and ticks >= 4
    # ...nor a websocket
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    t0 = time.monotonic()
    with connect(f"ws://127.0.0.1:{platform.http_port}/slow/ws") as ws, pytest.raises(ConnectionClosed):
        while time.monotonic() - t0 < 10:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
            time.sleep(0.3)
    assert 1.5 < time.monotonic() - t0 < 5


def test_calls_of_a_sync_function_at_once_on_one_instance_each_get_their_whole_timeout(
    platform: Platform,
) -> None:
    """A sync handler runs in a thread of its instance; sixteen calls at once on one instance all
    run at once, none waiting for a thread while its timeout (1 s) runs (a pool sized by the
    machine's cores, 6 here, had the second wave answer 504)."""
    platform.deploy(APPS / "e2e_slow")
    platform.cli("scale", "slow", "--min", "1", "--max", "1")
    platform.wait_for(
        lambda: [i for i in platform.instances("slow") if i["status"]["phase"] == "ready"],
        what="a ready instance",
    )
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: platform.invoke("slow", "nap", 0.6), range(16)))
    assert answers == [(200, "rested")] * 16, answers
    platform.cli("scale", "slow", "--min", "0", "--max", "10")


def test_requests_spread_over_instances(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy", "--name", "spread")
    platform.cli("scale", "spread", "--min", "3", "--max", "3")
    platform.wait_for(
        lambda: len([i for i in platform.instances("spread") if i["status"]["phase"] == "ready"]) == 3,
        what="3 ready instances",
    )
    pids = {json.loads(platform.cli("invoke", "spread.ok").stdout)["pid"] for _ in range(12)}
    assert len(pids) >= 2


def _responses(
    sock: socket.socket, n: int, head_only: bool = False
) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `n` whole answers off a raw connection (HEAD answers have no body, whatever they say)."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    current: dict[str, Any] = {}

    class Callbacks:
        def on_message_begin(self) -> None:
            current.update(headers={}, body=b"")

        def on_header(self, name: bytes, value: bytes) -> None:
            current["headers"][name.decode().lower()] = value.decode()

        def on_headers_complete(self) -> None:
            if head_only:
                out.append((parser.get_status_code(), current["headers"], b""))

        def on_body(self, body: bytes) -> None:
            current["body"] += body

        def on_message_complete(self) -> None:
            if not head_only:
                out.append((parser.get_status_code(), current["headers"], current["body"]))

    parser = httptools.HttpResponseParser(Callbacks())
    while len(out) < n:
        data = sock.recv(65536)
        assert data, f"the gateway closed the connection after {len(out)} of {n} answers"
        parser.feed_data(data)
    return out


def _connect(platform: Platform) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", platform.http_port), timeout=10)
    return sock


def test_one_connection_carries_pipelined_and_kept_alive_requests(
    platform: Platform, hello: dict[str, object]
) -> None:
    with _connect(platform) as sock:
        sock.sendall(
            b"GET /hello/ HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /hello/echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?n=3 HTTP/1.1\r\nHost: hello.localhost\r\n\r\n"
        )
        first, second, third = _responses(sock, 3)
        assert first[0] == 200 and first[2] == b"Hello from osless!\n"
        assert json.loads(second[2])["query"] == {"n": "2"}  # in the order asked
        assert json.loads(third[2]) == {"path": "/echo", "query": {"n": "3"}, "root_path": ""}
        sock.sendall(b"HEAD /hello/ HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, headers, body),) = _responses(sock, 1, head_only=True)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        sock.sendall(b"GET /hello/ HTTP/1.1\r\nHost: x\r\n\r\n")  # still usable after a HEAD
        assert _responses(sock, 1)[0][2] == b"Hello from osless!\n"


def test_expect_continue_http10_and_chunked_uploads(
    platform: Platform, flask_demo: dict[str, object]
) -> None:
    body = b'{"a": 1}'
    with _connect(platform) as sock:
        sock.sendall(
            b"POST /flask-demo/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # before any body is sent
        sock.sendall(body)
        ((status, _, answer),) = _responses(sock, 1)
        assert status == 200 and json.loads(answer)["received"] == {"a": 1}

    def chunks() -> Iterator[bytes]:
        yield b'{"parts": '
        yield b"[1, 2, 3]}"

    r = httpx.post(
        f"{platform.gateway}/flask-demo/echo", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["received"] == {"parts": [1, 2, 3]}

    with _connect(platform) as sock:
        sock.sendall(b"GET /flask-demo/ HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # an HTTP/1.0 answer ends with the connection
            data += chunk
        assert data.startswith(b"HTTP/1.") and data.endswith(b"Hello from Flask on osless!\n")


def test_garbage_is_a_400_and_forwarded_headers_are_the_gateways(
    platform: Platform, hello: dict[str, object]
) -> None:
    with _connect(platform) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        ((status, headers, body),) = _responses(sock, 1)
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "bad_request"
    r = httpx.get(f"{platform.gateway}/hello/echo", headers={"x-forwarded-prefix": "/forged"})
    assert r.json()["root_path"] == "/hello"


def test_a_chunked_upload_past_the_limit_is_413(platform: Platform, flask_demo: dict[str, object]) -> None:
    def chunked() -> Iterator[bytes]:  # no length up front: counted as it streams
        for _ in range(32):
            yield b"x" * (64 * 1024)

    platform.cli("scale", "flask-demo", "--max-body-mb", "1")
    try:
        # JSON, so that the app reads the body (rather than answer before it is all there)
        headers = {"content-type": "application/json"}
        r = httpx.post(f"{platform.gateway}/flask-demo/echo", content=chunked(), headers=headers, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    finally:
        platform.cli("scale", "flask-demo", "--max-body-mb", "10")
    r = httpx.post(f"{platform.gateway}/flask-demo/echo", content=chunked(), timeout=30)
    assert r.status_code == 200  # 2 MiB under a 10 MiB limit


def test_answers_of_the_gateways_own_follow_http(platform: Platform, hello: dict[str, object]) -> None:
    with _connect(platform) as sock:  # HEAD: the length, no body; the connection goes on
        sock.sendall(b"HEAD /_health HTTP/1.1\r\nHost: x\r\n\r\nGET /_health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until(sock, lambda d: d.endswith(b'{"ok": true}'))
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 12" in head
        assert rest.startswith(b"HTTP/1.1 200")  # right after the HEAD's headers: no body between
    with _connect(platform) as sock:  # a bad request behind a good one: the good one is answered first
        sock.sendall(b"GET /hello/ HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n")
        first, second = _responses(sock, 2)
        assert first[0] == 200 and first[2] == b"Hello from osless!\n"
        assert second[0] == 400 and second[1]["connection"] == "close"
    with _connect(platform) as sock:
        sock.sendall(b"GET /hello/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * (70 * 1024) + b"\r\n\r\n")
        ((status, _, body),) = _responses(sock, 1)
        assert status == 431 and json.loads(body)["error"]["code"] == "head_too_large"


def _raw_get(platform: Platform, target: bytes, headers: bytes) -> Any:
    """GET on a raw connection, with headers exactly as given (spellings an HTTP library would fix)."""
    with _connect(platform) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\n%s\r\n" % (target, headers))
        ((status, _, body),) = _responses(sock, 1)
    assert status == 200, body
    return json.loads(body)


def test_a_wsgi_app_sees_the_gateways_forwarded_headers_never_the_clients(
    platform: Platform, inspector: dict[str, object]
) -> None:
    forged = (
        b"Host: shop.example\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-FORWARDED-PROTO: https\r\nx-forwarded-host: evil.example\r\n"
        b"X-Forwarded-Prefix: /forged\r\n"
        # WSGI reads an underscore as a dash: these would reach the app as HTTP_X_FORWARDED_*
        b"X_Forwarded_For: 7.7.7.7\r\nx_forwarded_prefix: /forged2\r\nX_FORWARDED_HOST: evil2\r\n"
    )
    seen = _raw_get(platform, b"/inspector/where", forged)
    assert seen["headers"] == {
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": "shop.example",
        "x-forwarded-prefix": "/inspector",
    }
    assert seen["environ"] == {
        "HTTP_X_FORWARDED_FOR": "127.0.0.1",
        "HTTP_X_FORWARDED_PROTO": "http",
        "HTTP_X_FORWARDED_HOST": "shop.example",
        "HTTP_X_FORWARDED_PREFIX": "/inspector",
    }
    assert (seen["remote_addr"], seen["scheme"]) == ("127.0.0.1", "http")
    # by host: no prefix at all, whatever the client says
    seen = _raw_get(platform, b"/where", b"Host: inspector.localhost\r\nX-Forwarded-Prefix: /forged\r\n")
    assert "x-forwarded-prefix" not in seen["headers"] and seen["headers"]["x-forwarded-host"] == (
        "inspector.localhost"
    )


def test_wsgi_script_name_is_the_prefix_so_url_for_works_through_the_gateway(
    platform: Platform, inspector: dict[str, object]
) -> None:
    r = httpx.get(f"{platform.gateway}/inspector/where")
    seen = r.json()
    assert (seen["script_name"], seen["path_info"]) == ("/inspector", "/where")
    assert seen["url_for"] == "/inspector/where"
    host = f"127.0.0.1:{platform.http_port}"
    assert seen["external"] == f"http://{host}/inspector/where"
    assert httpx.get(seen["external"]).json() == seen  # the URL the app made leads back to it
    by_host = httpx.get(f"{platform.gateway}/where", headers={"host": "inspector.localhost"}).json()
    assert (by_host["script_name"], by_host["path_info"], by_host["url_for"]) == ("", "/where", "/where")
    assert by_host["external"] == "http://inspector.localhost/where"


def test_an_asgi_app_sees_the_whole_path_with_the_prefix_as_root_path(platform: Platform) -> None:
    """The path holds the prefix, root_path is it (as the ASGI spec says); by host, neither."""
    platform.deploy(APPS / "scoped")
    seen = httpx.get(f"{platform.gateway}/scoped/a/scope", timeout=30).json()
    assert seen == {"type": "http", "path": "/scoped/a/scope", "root_path": "/scoped", "raw_path": "/a/scope"}
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{platform.http_port}/scoped/a/scope") as ws:
        seen = json.loads(ws.recv(timeout=10))
    assert (seen["type"], seen["path"], seen["root_path"]) == ("websocket", "/scoped/a/scope", "/scoped")
    by_host = httpx.get(f"{platform.gateway}/a/scope", headers={"host": "scoped.localhost"}).json()
    assert (by_host["path"], by_host["root_path"]) == ("/a/scope", "")
    # Starlette takes root_path off once: /scoped/scoped/x is the app's /scoped/x, not its /x
    r = httpx.get(f"{platform.gateway}/scoped/scoped/x")
    assert r.json() == {"handler": "/scoped/x", "path": "/scoped/scoped/x"}
    assert httpx.get(f"{platform.gateway}/scoped/x").json() == {"handler": "/x", "path": "/scoped/x"}
    r = httpx.get(f"{platform.gateway}/x", headers={"host": "scoped.localhost"})
    assert r.json() == {"handler": "/x", "path": "/x"}


def test_a_wsgi_apps_path_info_loses_the_prefix_once(
    platform: Platform, inspector: dict[str, object]
) -> None:
    seen = httpx.get(f"{platform.gateway}/inspector/where").json()
    assert (seen["script_name"], seen["path_info"]) == ("/inspector", "/where")
    # the app has no /inspector/where: the prefix twice is not its /where
    assert httpx.get(f"{platform.gateway}/inspector/inspector/where").status_code == 404


def test_django_over_asgi_and_wsgi_builds_its_urls_and_redirects_with_the_prefix(platform: Platform) -> None:
    """Django 5 reads scope["path"] whole: without the prefix there, its redirects left /{app}/."""
    platform.deploy(APPS / "django_site")
    for over in ("ASGIRequest", "WSGIRequest"):
        if over == "WSGIRequest":  # a restart key: the factory runs again, and returns the WSGI app
            platform.cli("config", "set", "django-site", "interface=wsgi")
            platform.wait_for(
                lambda: (
                    httpx.get(f"{platform.gateway}/django-site/where/", timeout=30).json().get("over")
                    == "WSGIRequest"
                ),
                timeout=60,
                what="the WSGI app",
            )
        seen = httpx.get(f"{platform.gateway}/django-site/where/", timeout=30).json()
        assert seen == {
            "over": over,
            "path": "/django-site/where/",
            "path_info": "/where/",
            "reverse": "/django-site/where/",
        }
        r = httpx.get(f"{platform.gateway}/django-site/go/")
        assert r.status_code == 302 and r.headers["location"] == "/django-site/where/", over
        # a form posted where the redirect leads reaches the view (it was a 404 off the prefix)
        r = httpx.post(f"{platform.gateway}{r.headers['location']}", data={"a": "1"})
        assert r.status_code == 200 and r.json()["path"] == "/django-site/where/", over
        by_host = httpx.get(f"{platform.gateway}/where/", headers={"host": "django-site.localhost"}).json()
        assert by_host == {"over": over, "path": "/where/", "path_info": "/where/", "reverse": "/where/"}
        # the prefix twice is the site's /django-site/where/, which it has not
        assert httpx.get(f"{platform.gateway}/django-site/django-site/where/").status_code == 404, over
        # collected by the app's build step (collectstatic) into the image, served by WhiteNoise
        r = httpx.get(f"{platform.gateway}/django-site/static/site.css")
        assert r.status_code == 200 and r.text == "body { color: teal; }\n", over


SMUGGLED = b"GET /inspector/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /inspector/echo HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    "attack",
    [
        POST + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)),
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n" % (5 + len(SMUGGLED)),
        POST + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),
        POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        b"POST /inspector/echo HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n0\n\n",
        POST + b"Content-Length: +%d\r\n\r\n" % len(SMUGGLED),
    ],
    ids=[
        "cl-te",
        "te-cl",
        "two-lengths",
        "xchunked",
        "gzip",
        "two-coding-headers",
        "chunked-identity",
        "space-colon",
        "obs-fold",
        "bare-lf",
        "plus",
    ],
)
def test_ambiguous_framing_is_refused_and_smuggles_nothing(
    platform: Platform, inspector: dict[str, object], attack: bytes
) -> None:
    with _connect(platform) as sock:
        sock.sendall(attack + SMUGGLED)
        ((status, headers, body),) = _responses(sock, 1)
        assert status == 400 and headers["connection"] == "close", body
        assert json.loads(body)["error"]["code"] == "bad_request"
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # and nothing more: the rest was never taken for a request
    # The instance never saw the request hidden in the body, and the next client gets its own answer.
    seen = httpx.get(f"{platform.gateway}/inspector/seen").json()["paths"]
    assert not any(p.startswith("/smuggled") for p in seen), seen
    assert httpx.get(f"{platform.gateway}/inspector/where").json()["path_info"] == "/where"


def test_a_request_inside_a_body_stays_a_body(platform: Platform, inspector: dict[str, object]) -> None:
    with _connect(platform) as sock:
        sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED)
        ((status, _, body),) = _responses(sock, 1)
        assert status == 200 and body == SMUGGLED
        sock.sendall(
            POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        )
        ((status, _, body),) = _responses(sock, 1)
        assert status == 200 and body == SMUGGLED
    seen = httpx.get(f"{platform.gateway}/inspector/seen").json()["paths"]
    assert not any(p.startswith("/smuggled") for p in seen), seen


def test_slowloris_is_cut_off_and_starves_no_one(platform: Platform, inspector: dict[str, object]) -> None:
    """Clients that send a request head a byte at a time hold a connection for the keep-alive
    time at most (15 s), however long they keep trickling, and others are served meanwhile."""
    slow = [_connect(platform) for _ in range(200)]
    try:
        for sock in slow:
            sock.sendall(b"GET /inspector/where HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
        t0 = time.monotonic()
        alive = list(slow)
        while alive:
            assert time.monotonic() - t0 < 20, f"{len(alive)} slow heads still open"
            r = httpx.get(f"{platform.gateway}/inspector/where", timeout=5)
            assert r.status_code == 200 and r.elapsed.total_seconds() < 2
            for sock in list(alive):
                try:
                    sock.sendall(b"X-A: b\r\n")  # a header line each round: never a whole head
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    alive.remove(sock)
            time.sleep(0.5)
        assert time.monotonic() - t0 > 10  # not cut before its time either
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    ("path", "method"), [("/extra", b"GET"), ("/no-content", b"GET"), ("/head", b"HEAD")]
)
def test_bytes_past_an_instances_answer_never_reach_the_client(
    platform: Platform, hello: dict[str, object], path: str, method: bytes
) -> None:
    # A hostile app writes a second answer behind its first, in one write: relayed, it would be read
    # as the answer to the client's next request on the connection, which may be for another app
    # (a browser's, or a proxy's in front of the gateway carrying many users' requests).
    platform.deploy_warm(APPS / "splitter")
    with _connect(platform) as sock:
        sock.sendall(method + b" /splitter" + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, _, body),) = _responses(sock, 1, head_only=method == b"HEAD")
        assert status == 502 and b"smuggled" not in body, (status, body)
        sock.sendall(b"GET /hello/ HTTP/1.1\r\nHost: x\r\n\r\n")
        ((status, _, body),) = _responses(sock, 1)
        assert status == 200 and body == b"Hello from osless!\n", (status, body)


@contextlib.asynccontextmanager
async def _wired(
    forward: bytes, counted: list[bytes] | None = None
) -> AsyncIterator[tuple[socket.socket, socket.socket]]:
    """A client's connection and an instance's socket (both ours to drive, non-blocking) with the
    gateway's two halves between them, as its fast path joins them: the client's request makes the
    gateway write `forward` to the instance (with `counted`, each write of the gateway's noted)."""
    loop = asyncio.get_running_loop()
    client, gateway_side = socket.socketpair()
    gateway_up, instance = socket.socketpair()
    up = UpstreamConn(Upstream("unused"), loop)
    await loop.create_connection(lambda: up, sock=gateway_up)
    if counted is not None:
        up.transport = _Counted(up.transport, counted)  # type: ignore[arg-type,assignment]

    def fast(conn: ClientConnection, req: Request) -> bool:  # as `_Exchange.start` does
        up.begin(conn, False, lambda error: None)
        up.write(forward)
        conn.attach(up)
        req.attach(up)
        return True

    async def never(conn: ClientConnection, req: Request) -> None:
        raise AssertionError("the fast path takes it")

    conn = ClientConnection(never, loop, fast)
    await loop.connect_accepted_socket(lambda: conn, gateway_side)
    for s in (client, instance):
        s.setblocking(False)
    try:
        yield client, instance
    finally:
        for s in (client, instance):
            s.close()
        conn.transport.abort()
        up.abort()


class _Counted:
    """An upstream's own transport, its writes noted."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self.transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def test_a_requests_head_and_the_body_read_with_it_reach_the_instance_in_one_write() -> None:
    # Each write is a system call of the gateway's, and a read (a wakeup) of the instance's: a small
    # POST's head and body, read at once from the client, went out in two.
    head = b"POST /f HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n"
    writes: list[bytes] = []

    async def exchange() -> bytes:
        loop = asyncio.get_running_loop()
        async with _wired(head, writes) as (client, instance):
            await loop.sock_sendall(client, head + b"hello")
            got = b""
            while len(got) < len(head) + 5:
                got += await loop.sock_recv(instance, 4096)
            return got

    assert asyncio.run(exchange()) == head + b"hello"
    assert writes == [head + b"hello"]


def test_an_answer_cut_to_hide_a_session_cookie_still_loses_it() -> None:
    # A hostile instance writes its head in pieces, the cookie's name split across two of them, so
    # that no one read holds it: the head is held until whole, then filtered (gateway.cookies).
    pieces = [
        b"HTTP/1.1 200 OK\r\nset-cookie: osless_ses",
        b"sion=planted\r\nset-cookie: theirs=1\r\ncontent-length: 2\r\n\r\n",
        b"ok",
    ]
    request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"

    async def exchange() -> bytes:
        loop = asyncio.get_running_loop()
        async with _wired(request) as (client, instance):
            await loop.sock_sendall(client, request)
            await loop.sock_recv(instance, 4096)
            for piece in pieces:
                await loop.sock_sendall(instance, piece)
                await asyncio.sleep(0.05)  # each its own read of the gateway's
            got = b""
            while not got.endswith(b"ok"):
                got += await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
            return got

    assert (
        asyncio.run(exchange()) == b"HTTP/1.1 200 OK\r\nset-cookie: theirs=1\r\ncontent-length: 2\r\n\r\nok"
    )
