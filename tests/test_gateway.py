"""Web traffic through the gateway: ASGI and WSGI apps, path and host routing, clear errors."""

from __future__ import annotations

import httpx

from tests.platform import EXAMPLES, Platform


def test_asgi_app_by_path_and_by_host(platform: Platform, hello: dict[str, object]) -> None:
    r = httpx.get(f"{platform.gateway}/hello/")
    assert r.status_code == 200 and r.text == "Hello from osless!\n"
    r = httpx.get(f"{platform.gateway}/hello/echo", params={"x": "1"})
    assert r.json() == {"path": "/echo", "query": {"x": "1"}}
    r = httpx.get(f"{platform.gateway}/echo", params={"x": "2"}, headers={"host": "hello.localhost"})
    assert r.json() == {"path": "/echo", "query": {"x": "2"}}


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


def test_app_scaled_to_zero_answers_503(platform: Platform) -> None:
    platform.deploy(EXAMPLES / "hello", "--name", "hello-zero")
    platform.cli("scale", "hello-zero", "--min", "0", "--max", "1")
    platform.wait_for(lambda: not platform.instances("hello-zero"), what="instances to stop")
    r = httpx.get(f"{platform.gateway}/hello-zero/", timeout=40)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_instances" and r.headers["retry-after"] == "1"
    platform.cli("scale", "hello-zero", "--min", "1", "--max", "1")
    platform.wait_for(
        lambda: httpx.get(f"{platform.gateway}/hello-zero/").status_code == 200, what="scale up"
    )


def test_function_invoke_over_the_gateway_needs_a_token(platform: Platform, hello: dict[str, object]) -> None:
    url = f"{platform.gateway}/_functions/hello/greet"
    assert httpx.post(url, json={"name": "x"}).status_code == 401
    r = httpx.post(url, json={"name": "Lin"}, headers={"authorization": f"Bearer {platform.token}"})
    assert r.status_code == 200 and r.json()["message"] == "Hello, Lin!"
