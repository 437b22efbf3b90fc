"""osless on several processes: `osless server --etcd` with nodes that join it, and `osless cluster up`."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from osless.server.api import backup_prefix
from osless.store import open_store
from tests.etcd import EtcdCluster
from tests.platform import EXAMPLES, Node, Server


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_server_on_etcd_runs_apps_on_a_node_that_joined_it(etcd: EtcdCluster, tmp_path: Path) -> None:
    server = Server(tmp_path / "server" / "data", etcd=etcd.url(f"/t-{uuid.uuid4().hex[:8]}")).start()
    try:
        assert server.http("GET", "/v1/nodes").json()["items"] == []  # no node of its own
        node_dir = tmp_path / "n1" / "data"
        node_dir.mkdir(parents=True)
        # until nodes pull images over the API
        (node_dir / "images").symlink_to(server.data_dir / "images")
        node = Node(server, "n1", node_dir).start()
        try:
            listed = server.cli_json("nodes")
            assert [(n["name"], n["ready"], n["gateway"]) for n in listed] == [("n1", True, node.gateway)]
            deployed = server.deploy(EXAMPLES / "hello")  # built by the server, rolled out on n1
            assert deployed["app"] == "hello" and deployed["status"] == "succeeded", deployed
            server.wait_for(
                lambda: (
                    [(i["node"], i["status"]["phase"]) for i in server.instances("hello")]
                    == [("n1", "ready")]
                ),
                timeout=60,
                what="hello ready on n1",
            )
            assert httpx.get(f"{node.gateway}/hello/", timeout=10).text == "Hello from osless!\n"
            # Function calls go through a live node's gateway, found by the server.
            assert server.invoke("hello", "greet", {"name": "etcd"})[1]["message"] == "Hello, etcd!"
            server.cli("config", "history", "hello")
            assert [a["name"] for a in server.cli_json("apps")] == ["hello"]
        finally:
            node.stop()
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.output()[-2000:]


def test_a_second_server_with_another_secret_key_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    url = etcd.url(f"/t-{uuid.uuid4().hex[:8]}")
    first = Server(tmp_path / "a" / "data", etcd=url).start()
    try:
        second = Server(tmp_path / "b" / "data", etcd=url)
        with pytest.raises(RuntimeError, match="exited with 1"):
            second.start()
        assert "the same key" in second.output()
        # With the same key, it serves the same platform.
        key = (first.data_dir / "secret.key").read_text().strip()
        third = Server(tmp_path / "c" / "data", etcd=url, up_env={"OSLESS_SECRET_KEY": key}).start()
        third.stop()
    finally:
        first.stop()


def test_an_etcd_backup_holds_the_platforms_keys_only(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def go() -> Path:
        mine, other = open_store(etcd.url("/mine")), open_store(etcd.url("/other"))
        await mine.start()
        await other.start()
        try:
            await mine.put("/apps/a", b"\x00binary")
            await other.put("/apps/b", b"theirs")
            return await backup_prefix(mine, tmp_path, 1)
        finally:
            await mine.close()
            await other.close()

    path = asyncio.run(go())
    assert path.name.startswith("store.v1-") and path.name.endswith(".backup")
    head, *lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert head["schema"] == 1 and head["revision"] > 0
    assert [(r["key"], base64.b64decode(r["value"])) for r in lines] == [("/apps/a", b"\x00binary")]
