"""Web traffic through the gateway: ASGI and WSGI apps, path and host routing, clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


def test_asgi_app_by_path_and_by_host(platform: Platform, hello: dict[str, object]) -> None:
    r = httpx.get(f"{platform.gateway}/hello/")
    assert r.status_code == 200 and r.text == "Hello from osless!\n"
    r = httpx.get(f"{platform.gateway}/hello/echo", params={"x": "1"})
    # the prefix the gateway strips is the app's root_path, so the app can build its own URLs
    assert r.json() == {"path": "/echo", "query": {"x": "1"}, "root_path": "/hello"}
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


def test_requests_spread_over_instances(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy", "--name", "spread")
    platform.cli("scale", "spread", "--min", "3", "--max", "3")
    platform.wait_for(
        lambda: len([i for i in platform.instances("spread") if i["status"]["phase"] == "ready"]) == 3,
        what="3 ready instances",
    )
    pids = {json.loads(platform.cli("invoke", "spread.ok").stdout)["pid"] for _ in range(12)}
    assert len(pids) >= 2
