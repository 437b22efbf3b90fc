"""What the API shows other parts for its own calls: scoped tokens, never its caller's.

A node, or the gateway of one, may be taken over: it must never collect the tokens of whoever reads
logs (tests/test_node_api.py) or invokes functions through the API (here).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.etcd import EtcdCluster
from tests.platform import EXAMPLES, AuthRecorder, Node, Platform, Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    etcd = EtcdCluster(tmp_path / "etcd", tls=True).start()  # the server on etcd over TLS, as in production
    try:
        srv = Server(tmp_path / "server" / "data", etcd=etcd.url(f"/t-{uuid.uuid4().hex[:8]}")).start()
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        etcd.stop()


def test_a_gateway_is_shown_an_invoker_of_that_app_never_the_caller_s_token(
    server: Server, tmp_path: Path
) -> None:
    node = Node(server, "n1", tmp_path / "n1").start()
    try:
        server.deploy(EXAMPLES / "hello")
        # The server's own calls go through a live node's gateway.
        status, body = server.invoke("hello", "greet", {"name": "Kim"})
        assert status == 200 and body["message"] == "Hello, Kim!", body
    finally:
        node.stop()
    hostile = AuthRecorder(b'{"ok": true}', "application/json")  # a gateway answering 200
    try:
        # A node (here: as the admin may) names a gateway of its own; the server follows live nodes.
        r = server.http("PUT", "/v1/nodes/evil", json={"ttl_s": 300, "gateway": hostile.url})
        assert r.status_code == 200, r.text
        server.wait_for(lambda: server.invoke("hello", "greet", {})[0] == 200 and hostile.shown, timeout=30)
        shown = hostile.shown[-1]
        assert server.token not in shown and shown.startswith("Bearer osli_hello_"), shown
        invoker = shown.split(" ", 1)[1]
        me = httpx.get(f"{server.api}/v1/whoami", headers={"authorization": f"Bearer {invoker}"}).json()
        assert (
            me["role"] == "invoker"
            and me["app"] == "hello"
            and set(me["permissions"]) == {"whoami", "invoke"}
        )
        assert me["expires_at"] < time.time() + 200
        # It invokes that app and reads nothing.
        assert (
            httpx.get(f"{server.api}/v1/apps", headers={"authorization": f"Bearer {invoker}"}).status_code
            == 403
        )
    finally:
        hostile.close()


def test_a_node_token_is_revoked_only_when_asked_for_and_its_node_then_stops(
    own_platform: Platform, tmp_path: Path
) -> None:
    node = Node(own_platform, "lost", tmp_path / "lost").start()
    try:
        made = next(
            t
            for t in own_platform.cli_json("tokens", "ls")
            if t["role"] == "node" and t["name"] == "node:lost"
        )
        refused = own_platform.cli("tokens", "revoke", made["id"], check=False)
        assert refused.returncode != 0 and "--force" in refused.stderr
        own_platform.cli("tokens", "revoke", made["id"], "--force")
        # Its heartbeats are refused: its lease runs out and it leaves the list.
        own_platform.wait_for(
            lambda: "lost" not in {n["name"] for n in own_platform.cli_json("nodes")},
            timeout=20,
            what="the node with a revoked token to be gone",
        )
    finally:
        node.stop()
