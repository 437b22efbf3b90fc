"""Node failure, partitions and static stability: a second real node (`osless node join`)
stopped with SIGSTOP has its instances replaced within 10 s and stops them once it runs again; a
gateway whose API is stopped keeps serving what it knows."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform import Node, Platform, running

APPS = Path(__file__).parent / "apps"


def _ready(p: Platform, app: str) -> list[dict[str, Any]]:
    return [i for i in p.instances(app) if i["status"]["phase"] == "ready"]


def _nodes(p: Platform) -> set[str]:
    return {n["name"] for n in p.http("GET", "/v1/nodes").json()["items"]}


@pytest.fixture
def second_node(own_platform: Platform, tmp_path: Path) -> Iterator[Node]:
    """A second node on this machine (`osless node join`), with a node token made through the API."""
    node = Node(own_platform, "n2", tmp_path / "n2").start()
    try:
        yield node
    finally:
        node.stop()  # SIGCONT first: the node stops its instances and zygotes


def test_a_node_writes_the_status_of_its_own_instances_only(
    own_platform: Platform, second_node: Node
) -> None:
    p = own_platform
    p.deploy(APPS / "holder", "--detach")
    p.cli("scale", "holder", "--min", "2")
    ready = p.wait_for(lambda: len(r := _ready(p, "holder")) == 2 and r, timeout=60, what="two instances")
    theirs = next(i for i in ready if i["node"] != "n2")
    r = httpx.put(
        f"{p.api}/v1/instances/{theirs['id']}/status",
        json={"phase": "failed"},
        headers={"authorization": f"Bearer {second_node.token}"},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_this_node", r.text
    assert theirs["node"] in r.json()["error"]["message"]
    after = next(i for i in p.instances("holder") if i["id"] == theirs["id"])
    assert after["status"]["phase"] == "ready"
    # nor does it keep another node alive
    r = httpx.put(
        f"{p.api}/v1/nodes/{theirs['node']}",
        json={"ttl_s": 300},
        headers={"authorization": f"Bearer {second_node.token}"},
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_this_node", r.text


def test_a_stopped_node_is_replaced_within_10s_and_fences_itself_when_it_runs_again(
    own_platform: Platform, second_node: Node
) -> None:
    p = own_platform
    p.deploy(APPS / "holder", "--detach")
    p.cli("scale", "holder", "--min", "2")
    # Spread: one instance on each node.
    ready = p.wait_for(
        lambda: len(r := _ready(p, "holder")) == 2 and len({i["node"] for i in r}) == 2 and r,
        timeout=60,
        what="one ready instance on each node",
    )
    on_n2 = next(i for i in ready if i["node"] == "n2")
    pid = on_n2["status"]["pid"]
    assert running(pid)

    stopped_at = time.monotonic()
    assert second_node.proc is not None
    second_node.proc.send_signal(signal.SIGSTOP)
    p.wait_for(
        lambda: len(r := _ready(p, "holder")) == 2 and all(i["node"] != "n2" for i in r),
        timeout=20,
        what="the n2 instance replaced elsewhere",
    )
    took = time.monotonic() - stopped_at
    assert took <= 10.0, f"replaced {took:.1f}s after the node stopped"
    assert "n2" not in _nodes(p)
    assert running(pid)  # the node's instance lives on while its agent is stopped (a partition)

    second_node.proc.send_signal(signal.SIGCONT)
    # It learns its instance went elsewhere and stops it; it registers anew, and nothing comes back.
    p.wait_for(lambda: not running(pid), timeout=20, what="the fenced node to stop its old instance")
    p.wait_for(lambda: "n2" in _nodes(p), timeout=10, what="n2 to register again")
    assert "lease lapsed" in second_node.output()
    time.sleep(2)
    now = p.instances("holder")
    assert on_n2["id"] not in {i["id"] for i in now}
    assert len([i for i in now if i["status"]["phase"] == "ready"]) == 2


def test_a_node_without_the_memory_gets_nothing(own_platform: Platform) -> None:
    p = own_platform
    # A node that says it has 10 MB free: an instance of 256 MB does not fit there.
    tiny = {"ttl_s": 120, "memory_total_mb": 64, "memory_free_mb": 10}
    assert p.http("PUT", "/v1/nodes/tiny", json=tiny).status_code == 200
    p.deploy(APPS / "holder", "--detach")
    p.cli("scale", "holder", "--min", "3")
    ready = p.wait_for(lambda: len(r := _ready(p, "holder")) == 3 and r, timeout=60, what="three instances")
    assert all(i["node"] != "tiny" for i in ready)

    # An app whose instances ask more than any node has free: they wait, and the app says why.
    deploy = p.upload(APPS / "bigmem")
    p.wait_for(
        lambda: p.http("GET", f"/v1/deploys/{deploy['id']}").json()["status"] == "succeeded",
        timeout=120,
        what="the bigmem build",
    )
    app = p.wait_for(
        lambda: "65536 MB" in (a := p.http("GET", "/v1/apps/bigmem").json()["status"])["scale_reason"] and a,
        timeout=15,
        what="the reason the app waits",
    )
    assert app["scale_reason"].startswith("waiting:") and "tiny: 10 MB" in app["scale_reason"]
    assert p.instances("bigmem") == []


def test_a_gateway_keeps_serving_while_the_api_is_stopped(own_platform: Platform) -> None:
    p = own_platform
    p.deploy(APPS / "holder", "--detach")
    p.cli("scale", "holder", "--min", "1")
    p.wait_for(lambda: _ready(p, "holder"), timeout=60, what="an instance")
    p.wait_for(lambda: httpx.get(f"{p.gateway}/holder/", timeout=10).status_code == 200, what="routing")
    assert p.proc is not None
    p.proc.send_signal(signal.SIGSTOP)  # the API, the controllers and the node agent stop; not the rest
    try:

        def says_unreachable() -> bool:
            return "unreachable since" in httpx.get(f"{p.gateway}/_health", timeout=10).json().get("api", "")

        p.wait_for(says_unreachable, timeout=15, what="the gateways to notice")
        for _ in range(5):
            r = httpx.get(f"{p.gateway}/holder/", timeout=10)
            assert r.status_code == 200 and r.text == "held"
        assert "API unreachable since" in p.output()
        assert "serving the last known routes" in p.output()
    finally:
        p.proc.send_signal(signal.SIGCONT)
    p.wait_for(lambda: "API reachable again" in p.output(), timeout=15, what="the gateways to say so")
    p.wait_for(
        lambda: httpx.get(f"{p.gateway}/_health", timeout=10).json() == {"ok": True}, what="healthy again"
    )
