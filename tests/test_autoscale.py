"""Elastic: bursts are absorbed, idle apps go to zero and wake on the next request, limits answer at once."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform import EXAMPLES, Platform, copy_app, recv_until

APPS = Path(__file__).parent / "apps"


def ready(platform: Platform, app: str) -> list[dict[str, Any]]:
    return [i for i in platform.instances(app) if i["status"]["phase"] == "ready"]


@pytest.fixture(scope="module")
def streamer(platform: Platform) -> dict[str, Any]:
    return platform.deploy_warm(APPS / "streamer")


def test_idle_app_scales_to_zero_and_the_next_request_wakes_it(platform: Platform) -> None:
    platform.deploy(EXAMPLES / "hello", "--name", "sleepy")
    platform.cli("scale", "sleepy", "--min", "0", "--idle", "1")
    platform.wait_for(lambda: not platform.instances("sleepy"), what="scale to zero")
    assert "no request for" in platform.cli("ps", "sleepy").stdout
    t0 = time.monotonic()
    r = httpx.get(f"{platform.gateway}/sleepy/", timeout=30)
    assert r.status_code == 200 and r.text == "Hello from osless!\n"
    woke_in = time.monotonic() - t0
    assert woke_in < 5, woke_in
    # Why it woke, read at once: the reason `osless ps` shows (as it showed "no request for" above)
    # stays only until the next decision, zero again a second or two after this answer; a CLI's
    # start on a loaded machine may take that long.
    status = platform.http("GET", "/v1/apps/sleepy").json()["status"]
    assert status["scale_reason"] == "a request arrived while at zero", status
    # back at zero a moment later (its idle window is a second), and woken again as fast
    platform.wait_for(lambda: not platform.instances("sleepy"), what="scale to zero again")
    t0 = time.monotonic()
    assert httpx.get(f"{platform.gateway}/sleepy/", timeout=30).status_code == 200
    woke_again_in = time.monotonic() - t0
    assert woke_again_in < 2, woke_again_in
    # functions wake it too: any trigger that reaches the platform
    platform.wait_for(lambda: not platform.instances("sleepy"), what="scale to zero again")
    assert (
        json.loads(platform.cli("invoke", "sleepy.greet", '{"name": "Zed"}').stdout)["message"]
        == "Hello, Zed!"
    )


def test_a_burst_scales_up_and_every_request_is_answered(
    platform: Platform, streamer: dict[str, Any]
) -> None:
    platform.cli("scale", "streamer", "--min", "1", "--max", "6", "--target", "2")
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(24) as pool:

        def one(_: int) -> int:
            return client.get(f"{platform.gateway}/streamer/slow", params={"s": "0.5"}).status_code

        deadline = time.monotonic() + 8
        statuses: list[int] = []
        peak = 0
        while time.monotonic() < deadline:
            statuses += list(pool.map(one, range(24)))
            peak = max(peak, len(ready(platform, "streamer")))
    assert statuses and all(s == 200 for s in statuses), set(statuses)
    assert peak >= 3, peak  # 24 in flight at a target of 2 each: the autoscaler went well past 1
    platform.cli("scale", "streamer", "--min", "1", "--max", "10", "--target", "10")


def test_past_the_concurrency_limit_429_with_retry_after(
    platform: Platform, streamer: dict[str, Any]
) -> None:
    platform.cli("scale", "streamer", "--limit", "2")
    try:
        with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(
                pool.map(
                    lambda _: client.get(f"{platform.gateway}/streamer/slow", params={"s": "1"}), range(6)
                )
            )
        limited = [r for r in responses if r.status_code == 429]
        assert limited and all(r.headers["retry-after"] == "1" for r in limited)
        assert limited[0].json()["error"]["code"] == "too_many_requests"
        assert limited[0].elapsed.total_seconds() < 0.5  # at once, not queued
        assert sum(r.status_code == 200 for r in responses) >= 2
    finally:
        platform.cli("scale", "streamer", "--limit", "1000")


def test_body_limit_is_413(platform: Platform, streamer: dict[str, Any]) -> None:
    platform.cli("scale", "streamer", "--max-body-mb", "1")
    try:
        r = httpx.post(f"{platform.gateway}/streamer/slow", content=b"x" * (2 * 1024 * 1024), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    finally:
        platform.cli("scale", "streamer", "--max-body-mb", "10")


def test_clients_that_leave_or_answers_that_come_early_leave_nothing_behind(
    platform: Platform, streamer: dict[str, Any]
) -> None:
    """Counted requests end with their clients, however they end: a limit of 3 still lets 3 in."""
    platform.cli("scale", "streamer", "--limit", "3")
    try:
        for _ in range(3):  # at once, so most need new connections to the instance: the slow path
            socks = [socket.create_connection(("127.0.0.1", platform.http_port)) for _ in range(3)]
            for s in socks:
                s.sendall(b"GET /streamer/slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            for s in socks:
                s.close()  # gone mid-request
        time.sleep(1.5)  # the instance finishes the abandoned ones
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            codes = list(
                pool.map(
                    lambda _: httpx.get(f"{platform.gateway}/streamer/slow?s=0.3", timeout=30).status_code,
                    range(3),
                )
            )
        assert codes == [200, 200, 200]
    finally:
        platform.cli("scale", "streamer", "--limit", "1000")

    # An answer before the body is read (405: /slow takes GET only): the connection goes on.
    with socket.create_connection(("127.0.0.1", platform.http_port), timeout=10) as sock:
        body = b"x" * (800 * 1024)
        sock.sendall(
            b"POST /streamer/slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        sock.sendall(b"GET /streamer/slow?s=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until(sock, lambda d: d.count(b"HTTP/1.1 ") >= 2 and d.endswith(b"done"))
        assert data.startswith(b"HTTP/1.1 405") and b"HTTP/1.1 200" in data


def test_server_sent_events_and_websockets_pass_through(platform: Platform, streamer: dict[str, Any]) -> None:
    with httpx.stream("GET", f"{platform.gateway}/streamer/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines == ["data: tick 0", "data: tick 1", "data: tick 2"]
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{platform.http_port}/streamer/ws") as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo: hi"
        ws.send("again")
        assert ws.recv(timeout=10) == "echo: again"
    # an upgrade pipelined behind a plain request: answered in its turn, then a tunnel
    with socket.create_connection(("127.0.0.1", platform.http_port), timeout=10) as sock:
        sock.sendall(
            b"GET /streamer/slow?s=0 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /streamer/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = recv_until(sock, lambda d: b"HTTP/1.1 101" in d and d.endswith(b"\r\n\r\n"))
        assert data.startswith(b"HTTP/1.1 200") and b"\r\n\r\ndoneHTTP/1.1 101" in data
        mask = b"\x01\x02\x03\x04"
        sock.sendall(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi")))
        assert recv_until(sock, lambda d: len(d) >= 10) == b"\x81\x08echo: hi"


def test_an_instance_dying_mid_request_fails_a_post_and_its_next_run_answers_a_get(
    platform: Platform, streamer: dict[str, Any]
) -> None:
    """A request that reached the app is sent again only when it may be sent twice (GET, no body):
    a POST is a 502; a GET waits for the instance's next run, which answers it."""
    platform.cli("scale", "streamer", "--min", "1", "--max", "1")
    pid = None
    for method, status in (("POST", 502), ("GET", 200)):
        inst = platform.wait_for(
            lambda: [i for i in ready(platform, "streamer") if i["status"]["pid"] != pid],  # noqa: B023
            what="a ready instance (its next run)",
        )[0]
        pid = inst["status"]["pid"]
        result: dict[str, Any] = {}

        def slow() -> None:
            url = f"{platform.gateway}/streamer/work"  # /slow, for POST too
            result["r"] = httpx.request(method, url, params={"s": "5"}, timeout=30)  # noqa: B023

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        t.join()
        assert result["r"].status_code == status, result["r"].text
        if status == 502:
            assert result["r"].json()["error"]["code"] == "bad_gateway"
        else:
            assert result["r"].text == "done"
    r = httpx.get(f"{platform.gateway}/streamer/slow", params={"s": "0"}, timeout=30)
    assert r.status_code == 200
    platform.cli("scale", "streamer", "--min", "1", "--max", "10")


def test_redeploy_and_rollback_under_load_fail_no_request(platform: Platform, tmp_path: Path) -> None:
    src = copy_app(APPS / "e2e_versioned", tmp_path / "steady")
    platform.deploy(src, "--name", "steady")
    platform.cli("scale", "steady", "--min", "2", "--max", "4")
    platform.wait_for(lambda: len(ready(platform, "steady")) == 2, what="2 instances")
    failures: list[Any] = []
    seen: set[str] = set()
    done = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                r = client.get(f"{platform.gateway}/steady/")
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    seen.add(r.text)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        app_py = src / "app.py"
        app_py.write_text(app_py.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
        platform.deploy(src, "--name", "steady")
        platform.wait_for(lambda: "two" in seen, what="the new release to serve")
        platform.cli("rollback", "steady")
        platform.wait_for(
            lambda: (
                all(i["release"] == 3 for i in ready(platform, "steady"))
                and len(ready(platform, "steady")) == 2
            ),
            what="the rollback to finish",
        )
        time.sleep(1)
    finally:
        done.set()
        for w in workers:
            w.join()
    assert failures == []
    assert seen == {"one", "two"}


def test_the_default_policy_scales_a_burst_up_and_back_down(platform: Platform) -> None:
    platform.deploy(APPS / "streamer", "--name", "crowd")  # no `osless scale`: the defaults
    app = platform.http("GET", "/v1/apps/crowd").json()
    assert (app["min"], app["max"], app["status"]["desired"]) == (0, 10, 1)  # a new release starts with one
    assert app["autoscale"] == {
        "target": 10.0,  # requests in flight per instance
        "idle_s": 60.0,  # then zero
        "stable_s": 60.0,
        "panic_s": 6.0,
        "concurrency_limit": 1000,
        "max_body_mb": 10.0,
    }
    platform.wait_for(lambda: len(ready(platform, "crowd")) == 1, what="the first instance")

    # 40 in flight, four times the target for one instance: the short window reacts at once.
    peak: dict[str, Any] = {"desired": 1}  # the app's status
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses: list[int] = []
        for _ in range(3):
            statuses += pool.map(
                lambda _: client.get(f"{platform.gateway}/crowd/slow", params={"s": "1"}).status_code,
                range(40),
            )
            now = platform.http("GET", "/v1/apps/crowd").json()["status"]
            if now["desired"] > peak["desired"]:
                peak = now
    assert set(statuses) == {200}
    # Panic mode scaled up at once (ceil(in flight / target): 2 or 3, as the rounds fall in the short
    # window on a loaded machine).
    assert peak["desired"] >= 2 and peak["scale_reason"].startswith("panic"), peak
    # Once it has passed, the stable window brings it back to one (not zero: within the idle window).
    settled = platform.wait_for(
        lambda: (a := platform.http("GET", "/v1/apps/crowd").json()["status"])["desired"] == 1 and a,
        timeout=90,
        what="the app back to one instance",
    )
    reason = settled["scale_reason"]
    assert reason.endswith("in flight on average, target 10 per instance") or reason == (
        "kept warm: traffic within the idle window"
    ), reason
    platform.wait_for(lambda: len(platform.instances("crowd")) == 1, what="the extra instances to stop")
    platform.http("DELETE", "/v1/apps/crowd")


def test_an_idle_gateway_stops_reporting_and_traffic_is_reported_at_once(
    platform: Platform, hello: dict[str, Any]
) -> None:
    """An idle platform's gateways write nothing to the store (a report of nothing, once landed,
    says all the next would), and the first request after is in the autoscaler's figures."""
    db = sqlite3.connect(f"file:{platform.data_dir / 'state.db'}?mode=ro", uri=True)
    reports = "SELECT max(rev) FROM events WHERE key LIKE '/gatewaystats/%'"

    def quiet() -> bool:
        before = db.execute(reports).fetchone()[0]
        time.sleep(3)
        return bool(db.execute(reports).fetchone()[0] == before)

    try:
        platform.wait_for(quiet, timeout=60, what="the idle gateways to stop writing reports")
        assert httpx.get(f"{platform.gateway}/hello/", timeout=30).status_code == 200
        platform.wait_for(
            lambda: platform.http("GET", "/v1/stats").json()["apps"].get("hello", {}).get("requests", 0) > 0,
            timeout=10,
            what="the request in the gateways' figures",
        )
    finally:
        db.close()
