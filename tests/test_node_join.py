"""`osless node join`: a second node process joins a running platform over HTTP, with a node token."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from tests.platform import Node, Platform


def test_a_node_joins_with_a_node_token_and_is_listed(own_platform: Platform, tmp_path: Path) -> None:
    node = Node(own_platform, "second", tmp_path / "second").start()
    try:
        listed = {n["name"]: n for n in own_platform.cli_json("nodes")}
        assert set(listed) >= {"second"} and len(listed) == 2, listed
        second = listed["second"]
        assert second["ready"] and second["pid"] == node.proc.pid  # type: ignore[union-attr]
        assert second["gateway"] == node.gateway
        # Its gateway is a gateway like any: fed by the API's watches.
        assert httpx.get(f"{node.gateway}/_health", timeout=5).status_code == 200
        # Its folder is its own, private.
        assert (tmp_path / "second").stat().st_mode & 0o777 == 0o700
    finally:
        node.stop()
    assert node.proc is not None and node.proc.returncode == 0, node.output()[-2000:]


def test_a_token_of_another_role_cannot_join(own_platform: Platform, tmp_path: Path) -> None:
    made = own_platform.cli_json("tokens", "create", "--role", "read")
    r = subprocess.run(
        [own_platform.osless, "node", "join", "--api", own_platform.api, "--data-dir", str(tmp_path / "n")],
        env={**os.environ, "OSLESS_NODE_TOKEN": made["token"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "'read' token, not a node's" in r.stderr and "--role node" in r.stderr, r.stderr


def test_join_says_when_the_api_does_not_answer(tmp_path: Path) -> None:
    r = subprocess.run(
        [Platform(tmp_path).osless, "node", "join", "--api", "http://127.0.0.1:9", "--token", "osl_x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "the API does not answer" in r.stderr and "127.0.0.1:9" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_join_takes_an_ip_address_as_host(tmp_path: Path) -> None:
    # The API holds a node's URLs to the address it connects from: a name could resolve anywhere.
    r = subprocess.run(
        [
            *(Platform(tmp_path).osless, "node", "join", "--api", "http://127.0.0.1:9", "--token", "osl_x"),
            *("--host", "node.example", "--data-dir", str(tmp_path / "node")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "--host 'node.example' is not an IP address" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
