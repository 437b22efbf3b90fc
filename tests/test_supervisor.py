"""node.supervisor: instances that overrun their functions, get stuck, or lose their egress are replaced."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.platform import Platform, running

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def recycled(platform: Platform) -> Iterator[dict[str, Any]]:
    deployed = platform.deploy(APPS / "recycled")
    platform.cli("scale", "recycled", "--min", "1", "--max", "1")
    yield deployed


def _ready(platform: Platform) -> dict[str, Any]:
    ready: dict[str, Any] = platform.wait_for(
        lambda: [i for i in platform.instances("recycled") if i["status"]["phase"] == "ready"] or None,
        what="a ready instance of recycled",
    )[0]
    return ready


def test_a_function_past_its_timeout_leaves_no_running_code_behind(
    platform: Platform, recycled: dict[str, Any]
) -> None:
    """Finding 6: the handler ran on after the 504; after a few such calls every call timed out."""
    first = _ready(platform)
    old_pid = first["status"]["pid"]
    for _ in range(8):  # more than the instance's worker threads
        status, body = platform.invoke("recycled", "overrun")
        assert status == 504 and body["error"]["code"] == "timeout", body
        started = time.monotonic()
        status, who = platform.invoke("recycled", "whoami")
        assert status == 200, who
        assert time.monotonic() - started < 5  # served at once, by a fresh instance
    assert who["pid"] != old_pid
    # The overrunning code is gone with its instance, not parked in a thread somewhere.
    platform.wait_for(lambda: not running(old_pid), timeout=40, what=f"pid {old_pid} to end")
    instance = _ready(platform)
    assert instance["id"] == first["id"] and instance["status"]["restarts"] > first["status"]["restarts"]
    logs = platform.cli("logs", "recycled", "--tail", "200").stdout
    assert "replacing the instance: function overrun ran past its timeout" in logs


def test_a_stuck_instance_fails_its_health_check_and_leaves_the_rotation(
    platform: Platform, recycled: dict[str, Any]
) -> None:
    stuck_pid = _ready(platform)["status"]["pid"]
    status, body = platform.invoke("recycled", "block")  # its loop is blocked: nobody answers
    assert status == 504, body
    platform.wait_for(
        lambda: _ready(platform)["status"]["pid"] != stuck_pid, timeout=40, what="a replacement"
    )
    assert platform.invoke("recycled", "whoami")[0] == 200
    platform.wait_for(lambda: not running(stuck_pid), timeout=15, what=f"pid {stuck_pid} to be killed")
    logs = platform.cli("logs", "recycled", "--tail", "200").stdout
    assert "replacing the instance: unhealthy: no answer within" in logs


def test_a_killed_egress_forwarder_is_started_again(platform: Platform, recycled: dict[str, Any]) -> None:
    """Finding 8: the app could kill its forwarder, and egress was then gone for good."""
    assert platform.invoke("recycled", "fetch_self") == (200, {"status": 200, "body": "ok"})
    status, killed = platform.invoke("recycled", "cut_egress")
    assert status == 200 and killed, killed
    platform.wait_for(
        lambda: platform.invoke("recycled", "fetch_self")[1] == {"status": 200, "body": "ok"},
        timeout=10,
        what="egress back",
    )
