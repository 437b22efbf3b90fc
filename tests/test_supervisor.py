"""node.supervisor: instances that overrun their functions, get stuck, or lose their egress are replaced."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform import Platform, copy_app, running

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


# -- Stops: a replaced instance finishes its requests within their time ------------------------------

DRAIN_GRACE_S = 15 + 1 + 5  # tests/apps/draining: its longest timeout, uvicorn's second, STOP_GRACE


@pytest.fixture(scope="module")
def draining(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tests/apps/draining, one instance, from a copy a test may deploy again changed."""
    src = copy_app(APPS / "draining", tmp_path_factory.mktemp("draining") / "draining")
    platform.deploy(src)
    platform.cli("scale", "draining", "--min", "1", "--max", "1")
    yield src


def _only_ready(platform: Platform, app: str, other_than: str = "") -> dict[str, Any]:
    """The app's one ready instance, waiting while another (`other_than`: its id) is the ready one."""
    found: dict[str, Any] = platform.wait_for(
        lambda: (
            [i for i in platform.instances(app) if i["status"]["phase"] == "ready" and i["id"] != other_than]
            or None
        ),
        what=f"a ready instance of {app}",
    )[0]
    return found


def _reached(platform: Platform, count: int) -> None:
    """Wait until `count` requests are in an instance of draining (sent to it, not answered): what
    a node reports of its gateways' traffic each second, in `osless top`."""
    platform.wait_for(
        lambda: platform.http("GET", "/v1/top").json()["apps"]["draining"]["in_flight"] >= count,
        timeout=30,
        what=f"{count} requests in an instance of draining",
    )


class _Slow:
    """A web request and a function call of `seconds` each, under way in threads."""

    def __init__(self, platform: Platform, seconds: float) -> None:
        self.answers: dict[str, tuple[int, Any]] = {}

        def web() -> None:
            r = httpx.get(f"{platform.gateway}/draining/", params={"s": seconds}, timeout=60)
            self.answers["web"] = (r.status_code, r.json() if r.status_code == 200 else r.text)

        def call() -> None:
            self.answers["call"] = platform.invoke("draining", "nap", {"s": seconds})

        self.threads = [threading.Thread(target=web), threading.Thread(target=call)]
        for t in self.threads:
            t.start()
        _reached(platform, 2)

    def running(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def answered(self) -> dict[str, tuple[int, Any]]:
        for t in self.threads:
            t.join(60)
        return self.answers


def _taken_off(platform: Platform, instance: str) -> None:
    platform.wait_for(
        lambda: instance not in {i["id"] for i in platform.instances("draining")},
        timeout=60,
        what=f"{instance} taken off the node",
    )


def _no_health_check_while_draining(platform: Platform, instance: str) -> None:
    """Its control socket closed on SIGTERM: a check would have failed, and after three, killed it."""
    logs = platform.cli("logs", "draining", "--tail", "300").stdout
    own = [line for line in logs.splitlines() if f" {instance} [osless] " in line]
    assert own and not [line for line in own if "health check failed" in line or "unhealthy" in line], own


def test_a_restart_lets_requests_in_flight_finish_and_sends_new_ones_to_the_new_instance(
    platform: Platform, draining: Path
) -> None:
    """`osless restart`: the old instance, taken off the node while a web request and a function call
    of 10 s run in it, answers both (5 s after SIGTERM it was killed: 502s), is not health-checked as
    it drains (its control socket is closed), and takes none of the requests that come meanwhile."""
    old = _only_ready(platform, "draining")
    slow = _Slow(platform, 10)
    platform.cli("restart", "draining")
    assert slow.running()  # the old instance was taken off the node while they ran
    new = _only_ready(platform, "draining", other_than=old["id"])
    for _ in range(3):
        status, who = platform.invoke("draining", "who")
        assert status == 200 and who["instance"] == new["id"], who
        web = httpx.get(f"{platform.gateway}/draining/", timeout=10)
        assert web.status_code == 200 and web.json()["instance"] == new["id"], web.text
    assert running(old["status"]["pid"])  # still draining
    answers = slow.answered()
    for kind in ("web", "call"):
        status, body = answers[kind]
        assert status == 200 and body["instance"] == old["id"], (kind, answers)
    platform.wait_for(lambda: not running(old["status"]["pid"]), timeout=15, what="the old instance to end")
    _no_health_check_while_draining(platform, old["id"])


def test_a_deploy_lets_requests_in_flight_on_the_old_release_finish(
    platform: Platform, draining: Path
) -> None:
    """A deploy of a new release: the old release's instance answers what it holds, within its time."""
    old = _only_ready(platform, "draining")
    app = draining / "app.py"
    app.write_text(app.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    platform.upload(draining)
    platform.wait_for(
        lambda: [i for i in platform.instances("draining") if i["release"] != old["release"]],
        timeout=120,
        what="the new release's instance",
    )
    slow = _Slow(platform, 10)  # on the old release: the new one takes 4 s to start
    _taken_off(platform, old["id"])
    assert slow.running()
    answers = slow.answered()
    for kind in ("web", "call"):
        status, body = answers[kind]
        assert status == 200 and body["version"] == "one" and body["instance"] == old["id"], (kind, answers)
    status, who = platform.invoke("draining", "who")
    assert status == 200 and who["version"] == "two", who
    _no_health_check_while_draining(platform, old["id"])


def test_a_config_change_that_restarts_lets_a_call_in_flight_finish(
    platform: Platform, draining: Path
) -> None:
    """A config key read once at start (`restart=True`): the node replaces the instance in place
    (`Supervisor.restart`). A call of 14 s in it answers. The old run, out of rotation (`stopping`),
    was health-checked as it drained: its closed control socket failed every check, and a third
    failure (12 to 18 s in) had it killed."""
    status, old = platform.invoke("draining", "who")
    assert status == 200, old
    answers: list[tuple[int, Any]] = []
    call = threading.Thread(target=lambda: answers.append(platform.invoke("draining", "nap", {"s": 14})))
    call.start()
    _reached(platform, 1)
    colour = "blue" if "blue" not in platform.cli("config", "get", "draining", "colour").stdout else "green"
    platform.cli("config", "set", "draining", f"colour={colour}")
    platform.wait_for(
        lambda: [i for i in platform.instances("draining") if i["status"]["phase"] == "stopping"],
        timeout=15,
        what="the node to roll the instance",
    )
    assert call.is_alive()  # out of rotation, draining, while the call runs
    # Meanwhile a call waits for the new run: none other is ready.
    who = platform.wait_for(
        lambda: (w := platform.invoke("draining", "who")[1])["run"] != old["run"] and w,
        timeout=40,
        what="the new run",
    )
    assert who["instance"] == old["instance"], who
    call.join(60)
    _no_health_check_while_draining(platform, old["instance"])
    assert answers and answers[0][0] == 200 and answers[0][1]["run"] == old["run"], answers


def test_a_stuck_instance_is_killed_after_its_grace(platform: Platform, draining: Path) -> None:
    """An instance that ignores SIGTERM is SIGKILLed once its grace has passed: longer than 5 s, and
    not much longer than its handlers' longest timeout."""
    pid = _only_ready(platform, "draining")["status"]["pid"]  # the host's
    status, deaf = platform.invoke("draining", "deaf")
    assert status == 200, deaf
    platform.cli("restart", "draining", "--no-wait")
    _taken_off(platform, deaf["instance"])
    stopped = time.monotonic()  # and its node tells it to stop
    time.sleep(8)
    assert running(pid)  # past the 5 s a stopping node gives: the instance's own grace
    platform.wait_for(lambda: not running(pid), timeout=DRAIN_GRACE_S + 10, what="SIGKILL")
    assert time.monotonic() - stopped < DRAIN_GRACE_S + 15
    logs = platform.cli("logs", "draining", "--tail", "300").stdout
    assert f"{deaf['instance']} [osless] instance stopped (killed by SIGKILL)" in logs, logs


def test_the_node_stopping_gives_its_instances_5s(own_platform: Platform) -> None:
    """`osless up` stopping (Ctrl-C, SIGTERM): an instance that ignores SIGTERM is killed after 5 s,
    not after its own grace (21 s here)."""
    own_platform.deploy(APPS / "draining")
    status, deaf = own_platform.invoke("draining", "deaf")
    assert status == 200, deaf
    pid = _only_ready(own_platform, "draining")["status"]["pid"]
    proc = own_platform.proc
    assert proc is not None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert time.monotonic() - started < 16, own_platform.output()[-2000:]  # not its 21 s
    assert not running(pid)
