"""What the API shows other parts for its own calls: scoped tokens, never its caller's.

A node, or the gateway of one, may be taken over: it must never collect the tokens of whoever reads
logs (tests/test_node_api.py) or invokes functions through the API (here).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.etcd import EtcdCluster
from tests.platform import EXAMPLES, Node, Platform, Server, recv_until


class RecordingGateway:
    """A 'gateway' a hostile node names in its heartbeat: notes what it is shown, answers 200."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.shown: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                head = recv_until(conn, lambda b: b"\r\n\r\n" in b).decode("latin-1")
                self.shown += [
                    line.split(":", 1)[1].strip()
                    for line in head.split("\r\n")
                    if line.lower().startswith("authorization:")
                ]
                body = json.dumps({"ok": True}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def close(self) -> None:
        self.server.close()


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
    hostile = RecordingGateway()
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
