"""The platform's own roles: a node reads secrets only of the apps placed on it, and acts only for
itself; its gateways and the controllers read no secrets at all."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"
SECRET = "roles-secret-4242"


def token(platform: Platform, role: str, name: str | None = None) -> str:
    body: dict[str, Any] = {"role": role} if name is None else {"role": role, "name": name}
    r = platform.http("POST", "/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def call(platform: Platform, tok: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method, platform.api + path, headers={"authorization": f"Bearer {tok}"}, timeout=30, **kw
    )


def own_node(platform: Platform) -> str:
    nodes = [n for n in platform.http("GET", "/v1/nodes").json()["items"] if n["gateway"]]
    assert len(nodes) == 1, nodes
    return str(nodes[0]["name"])


def set_secret(platform: Platform, app: str, value: str = SECRET) -> None:
    r = platform.http("PATCH", f"/v1/apps/{app}/config", json={"set": {"db_password": value}})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def apps(platform: Platform) -> tuple[str, str]:
    """("roles-placed", kept at one instance; "roles-idle", at zero): both with a secret set."""
    platform.deploy_warm(APPS / "configured", "--name", "roles-placed")
    platform.deploy(APPS / "configured", "--name", "roles-idle")
    platform.cli("scale", "roles-idle", "--min", "0", "--idle", "1")
    for app in ("roles-placed", "roles-idle"):
        set_secret(platform, app)
    platform.wait_for(lambda: not platform.instances("roles-idle"), timeout=60, what="roles-idle at zero")
    return "roles-placed", "roles-idle"


def test_a_node_reads_secrets_only_of_the_apps_placed_on_it(
    platform: Platform, apps: tuple[str, str]
) -> None:
    placed, idle = apps
    node = own_node(platform)
    mine = token(platform, "node", node)  # a second token for the platform's own node
    r = call(platform, mine, "GET", f"/v1/nodes/{node}/apps/{placed}/config")
    assert r.status_code == 200 and r.json()["values"]["db_password"] == SECRET, r.text
    r = call(platform, mine, "GET", f"/v1/nodes/{node}/apps/{idle}/config")
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_placed", r.text
    assert SECRET not in r.text
    listed = call(platform, mine, "GET", f"/v1/nodes/{node}/config").json()["items"]
    assert placed in {c["app"] for c in listed} and idle not in {c["app"] for c in listed}
    # Another node's token reads nothing of this node, placed or not.
    other = token(platform, "node", "roles-elsewhere")
    for path in (f"/v1/nodes/{node}/apps/{placed}/config", f"/v1/nodes/{node}/config"):
        r = call(platform, other, "GET", path)
        assert r.status_code == 403 and "roles-elsewhere" in r.json()["error"]["message"], r.text
    r = call(platform, other, "GET", f"/v1/nodes/roles-elsewhere/apps/{placed}/config")
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_placed"
    assert call(platform, other, "GET", "/v1/nodes/roles-elsewhere/config").json()["items"] == []


def test_the_config_watch_carries_values_only_while_an_app_is_placed(
    platform: Platform, apps: tuple[str, str]
) -> None:
    _, idle = apps
    node = own_node(platform)
    mine = token(platform, "node", node)
    listed = call(platform, mine, "GET", f"/v1/nodes/{node}/config").json()
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    done = threading.Event()

    def follow() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream(
                "GET",
                f"{platform.api}/v1/nodes/{node}/config",
                params={"watch": "true", "revision": listed["revision"]},
                headers={"authorization": f"Bearer {mine}"},
                timeout=60,
            ) as r,
        ):
            for line in r.iter_lines():
                if done.is_set():
                    return
                ev = json.loads(line)
                if ev["type"] != "BOOKMARK":
                    events.put(ev)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        placed_later(platform, idle, events)
    finally:
        done.set()
        follower.join(15)


def placed_later(platform: Platform, idle: str, events: queue.Queue[dict[str, Any]]) -> None:
    time.sleep(0.5)
    set_secret(platform, idle, "not-for-this-node")
    ev = events.get(timeout=30)
    # Not placed: the node is told to forget it, and learns nothing of it.
    assert (ev["type"], ev["name"], ev["object"]) == ("DELETE", idle, None), ev
    # Placed later: its changes carry the values.
    assert platform.http("POST", f"/v1/apps/{idle}/wake").status_code == 200
    platform.wait_for(lambda: platform.instances(idle), what="an instance of roles-idle")
    set_secret(platform, idle, "now-for-this-node")
    ev = events.get(timeout=30)
    assert ev["type"] == "PUT" and ev["object"]["values"]["db_password"] == "now-for-this-node", ev


def test_a_node_reports_only_for_itself(platform: Platform) -> None:
    node = own_node(platform)
    mine = token(platform, "node", f"node:{node}")  # named with the prefix or without
    # Its own heartbeat, as its agent sends it (no other node is made up: the scheduler would use it).
    report = next(n for n in platform.http("GET", "/v1/nodes").json()["items"] if n["name"] == node)
    lease = {k: v for k, v in report.items() if k not in ("name", "updated_at")}
    r = call(platform, mine, "PUT", f"/v1/nodes/{node}", json=lease)
    assert r.status_code == 200, r.text
    for method, path, body in (
        ("PUT", "/v1/nodes/roles-victim", {"ttl_s": 2}),
        ("PUT", "/v1/nodes/roles-victim/calls", {"calls": []}),
        ("POST", "/v1/nodes/roles-victim/gateway-token", None),
    ):
        r = call(platform, mine, method, path, json=body)
        assert r.status_code == 403, (path, r.text)
        assert f"node {node!r}" in r.json()["error"]["message"] and "'roles-victim'" in r.text
    assert "roles-victim" not in {n["name"] for n in platform.http("GET", "/v1/nodes").json()["items"]}
    # Nor does it make tokens, deploy, or read logs.
    assert call(platform, mine, "POST", "/v1/tokens", json={"role": "admin"}).status_code == 403
    assert call(platform, mine, "PUT", "/v1/apps/x/scale", json={"min": 1}).status_code == 403
    # A node token is for one node: the CLI asks for its name.
    r = platform.cli("tokens", "create", "--role", "node", check=False)
    assert r.returncode == 1 and "pass --name NODE" in r.stderr, r.stderr


def test_a_gateway_token_routes_and_reads_no_secrets(platform: Platform, apps: tuple[str, str]) -> None:
    placed, _ = apps
    node = own_node(platform)
    # For a node of its own: asking again for the platform's node would revoke its gateways' token.
    made = call(platform, token(platform, "node", "roles-gw"), "POST", "/v1/nodes/roles-gw/gateway-token")
    assert made.status_code == 201 and made.json()["name"] == "gateway:roles-gw"
    gw = made.json()["token"]
    assert call(platform, gw, "GET", "/v1/apps").status_code == 200
    assert call(platform, gw, "GET", "/v1/instances").status_code == 200
    assert call(platform, gw, "POST", f"/v1/apps/{placed}/wake").status_code == 200
    stats = {"interval_s": 1, "apps": {}}
    assert call(platform, gw, "PUT", "/v1/gateways/roles-gw.gw-9/stats", json=stats).status_code == 200
    assert call(platform, gw, "PUT", f"/v1/gateways/{node}.gw-1/stats", json=stats).status_code == 403
    # Only its own node's gateway names, only apps that exist, figures within bounds: made-up
    # reports cannot drive the autoscaler or fill the store.
    for name in ("roles-gw.gw-0", "roles-gw.gw-257", "roles-gw.evil", "roles-gw"):
        assert call(platform, gw, "PUT", f"/v1/gateways/{name}/stats", json=stats).status_code == 422, name
    made_up = {"interval_s": 1, "apps": {"no-such-app": {"concurrency": 5.0}}}
    assert call(platform, gw, "PUT", "/v1/gateways/roles-gw.gw-9/stats", json=made_up).json() == {"apps": 0}
    huge = {"interval_s": 1, "apps": {placed: {"concurrency": 1e9}}}
    assert call(platform, gw, "PUT", "/v1/gateways/roles-gw.gw-9/stats", json=huge).status_code == 422
    for method, path in (
        ("GET", f"/v1/nodes/{node}/apps/{placed}/config"),
        ("GET", "/v1/nodes/roles-gw/config"),
        ("PUT", "/v1/nodes/roles-gw"),
        ("POST", "/v1/nodes/roles-gw/gateway-token"),
        ("DELETE", "/v1/instances/none"),
        ("POST", "/v1/tokens"),
        ("GET", f"/v1/apps/{placed}/logs"),
    ):
        r = call(platform, gw, method, path, json={})
        assert r.status_code == 403, (method, path, r.text)
        assert SECRET not in r.text
    # One gateway token per node: asking again replaces it.
    again = call(platform, token(platform, "node", "roles-gw"), "POST", "/v1/nodes/roles-gw/gateway-token")
    assert again.status_code == 201
    assert call(platform, gw, "GET", "/v1/apps").status_code == 401
    tokens = platform.http("GET", "/v1/tokens").json()["items"]
    assert len([t for t in tokens if t["role"] == "gateway" and t["name"] == "gateway:roles-gw"]) == 1


def test_the_platforms_gateways_act_with_a_gateway_token(own_platform: Platform) -> None:
    tokens = own_platform.http("GET", "/v1/tokens").json()["items"]
    gateways = [t for t in tokens if t["role"] == "gateway"]
    assert len(gateways) == 1, tokens
    # The gateway processes list and watch the routing table with it: it is in use.
    own_platform.wait_for(
        lambda: any(
            t["last_used_at"]
            for t in own_platform.http("GET", "/v1/tokens").json()["items"]
            if t["role"] == "gateway"
        ),
        what="the gateway token in use",
    )
    controllers = [t for t in tokens if t["role"] == "controller"]
    assert len(controllers) == 1, tokens


def test_a_controller_token_schedules_and_reads_no_secrets(platform: Platform, apps: tuple[str, str]) -> None:
    placed, _ = apps
    ctl = token(platform, "controller", "roles-controller")
    status = platform.http("GET", f"/v1/apps/{placed}").json()["status"]
    body = {"desired": status["desired"], "reason": status["scale_reason"]}
    assert call(platform, ctl, "PUT", f"/v1/apps/{placed}/desired", json=body).status_code == 200
    node = own_node(platform)
    for method, path in (
        ("GET", f"/v1/nodes/{node}/apps/{placed}/config"),
        ("GET", f"/v1/nodes/{node}/config"),
        ("POST", "/v1/tokens"),
        ("POST", f"/v1/nodes/{node}/gateway-token"),
        ("PUT", f"/v1/nodes/{node}"),
        ("PATCH", f"/v1/apps/{placed}/config"),
    ):
        r = call(platform, ctl, method, path, json={})
        assert r.status_code == 403, (method, path, r.text)
        assert SECRET not in r.text


def test_a_change_made_while_an_app_was_at_zero_reaches_its_next_instance(platform: Platform) -> None:
    # Its zygote lingers on the node, warm, while no instance is placed there: the node is sent no
    # values then, and must read them again when the app comes back.
    platform.deploy(APPS / "configured", "--name", "roles-linger")
    set_secret(platform, "roles-linger")
    platform.cli("scale", "roles-linger", "--min", "0", "--idle", "1")
    platform.wait_for(lambda: not platform.instances("roles-linger"), timeout=60, what="roles-linger at zero")
    r = platform.http("PATCH", "/v1/apps/roles-linger/config", json={"set": {"greeting": "while-at-zero"}})
    assert r.status_code == 200, r.text

    def greeting() -> str:
        status, body = platform.invoke("roles-linger", "read")  # wakes it
        assert status == 200, body
        return str(body["greeting"])

    platform.wait_for(lambda: greeting() == "while-at-zero", timeout=20, what="the change made at zero")
