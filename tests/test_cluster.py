"""osless on several processes: `osless server --etcd` with nodes that join it, and `osless cluster up`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.server.api import backup_prefix
from osless.store import open_store
from tests.etcd import EtcdCluster
from tests.platform import EXAMPLES, OSLESS, Cluster, Server, free_port, running


def test_a_server_on_etcd_runs_apps_on_nodes_that_joined_it(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, size=2).start()
    server = cluster.server
    try:
        listed = server.cli_json("nodes")  # the server has no node of its own
        assert sorted((n["name"], n["ready"], n["gateway"]) for n in listed) == [
            (n.name, True, n.gateway) for n in cluster.nodes
        ]
        deployed = server.deploy(EXAMPLES / "hello")  # built by the server, rolled out on the nodes
        assert deployed["app"] == "hello" and deployed["status"] == "succeeded", deployed
        server.cli("scale", "hello", "--min", "2")
        server.wait_for(
            lambda: (
                sorted((i["node"], i["status"]["phase"]) for i in server.instances("hello"))
                == [("n1", "ready"), ("n2", "ready")]
            ),
            timeout=60,
            what="hello ready on both nodes",
        )
        for node in cluster.nodes:
            assert httpx.get(f"{node.gateway}/hello/", timeout=10).text == "Hello from osless!\n"
        # Function calls go through a live node's gateway, found by the server.
        assert server.invoke("hello", "greet", {"name": "etcd"})[1]["message"] == "Hello, etcd!"
        server.cli("config", "history", "hello")
        assert [a["name"] for a in server.cli_json("apps")] == ["hello"]
    finally:
        cluster.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.output()[-2000:]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop()


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


def two_free_ports() -> int:
    """A free port whose next one is free too (etcd's client and peer ports)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def read_json(stream: Any, err: Path) -> Any:
    """The one JSON object a command prints once ready (it goes on running)."""
    text = b""
    while True:
        line = stream.readline()
        assert line, f"ended before a whole JSON object: {text!r}; {err.read_text()[-3000:]}"
        text += line
        if line.rstrip() == b"}":
            return json.loads(text)


def descendants(pid: int) -> set[int]:
    """Every process under `pid` (read from /proc), in whatever session or pid namespace."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_cluster_up_starts_three_nodes_on_three_addresses_and_stops_them_all(tmp_path: Path) -> None:
    env = {**os.environ, "OSLESS_CONFIG_DIR": str(tmp_path / "cli-config"), "COLUMNS": "200"}
    ports = [str(free_port()), str(free_port()), str(two_free_ports())]
    options = ["--api-port", ports[0], "--http-port", ports[1], "--etcd-port", ports[2]]
    options += ["--nats-port", str(free_port())]
    err = (tmp_path / "cluster.err").open("wb")
    proc = subprocess.Popen(
        [OSLESS, "cluster", "up", "--nodes", "3", "--dir", str(tmp_path / "c"), "--json", *options],
        stdout=subprocess.PIPE,
        stderr=err,
        env=env,
    )
    err.close()
    try:
        assert proc.stdout is not None
        described = read_json(proc.stdout, tmp_path / "cluster.err")
        listed = json.loads(
            subprocess.run(
                [OSLESS, "nodes", "--json"], env=env, capture_output=True, check=True, timeout=60
            ).stdout
        )
        addresses = {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
        assert {(n["name"], n["address"], n["ready"]) for n in listed} == {
            (f"n{k}", f"127.0.0.{k + 1}", True) for k in (1, 2, 3)
        }, listed
        assert {n["address"] for n in described["nodes"]} == addresses
        for n in described["nodes"]:
            assert httpx.get(f"{n['gateway']}/_health", timeout=5).status_code == 200
        assert described["nodes"][0]["gateway"] == f"http://127.0.0.2:{ports[1]}"
        # One message engine for the cluster's servers (the server's own folder has none).
        assert running(described["nats"]["pid"]) and (tmp_path / "c" / "nats" / "js").is_dir()
        assert not (tmp_path / "c" / "server" / "nats").exists()
        # A part that dies is said loudly; the others go on.
        running_before = descendants(proc.pid)
        os.kill(described["nodes"][1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "CLUSTER PART DIED: n2" not in (tmp_path / "cluster.err").read_text():
            assert time.monotonic() < deadline, (tmp_path / "cluster.err").read_text()[-2000:]
            time.sleep(0.1)
        assert httpx.get(f"{described['nodes'][0]['gateway']}/_health", timeout=5).status_code == 200
        assert running_before
    finally:
        everything = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0, (tmp_path / "cluster.err").read_text()[-2000:]
    left = [p for p in everything if running(p)]
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]


ORPHANED = "the builder building it stopped: deploy again"
STOPPED = "the builder stopped mid-build: deploy again"


def slow_app(dest: Path, seconds: int) -> Path:
    """An app whose build stays `building` for `seconds` (its import sleeps, and a build imports it)."""
    dest.mkdir(parents=True)
    (dest / "app.py").write_text(
        "import sys, time\nimport osless\n"
        "print('importing slowly', file=sys.stderr, flush=True)\n"
        f"time.sleep({seconds})\n"
        "app = osless.App('slow')\n"
    )
    return dest


def deploy_status(server: Server, deploy_id: str) -> dict[str, Any]:
    r = server.http("GET", f"/v1/deploys/{deploy_id}")
    assert r.status_code == 200, r.text  # never lost
    found: dict[str, Any] = r.json()
    return found


def test_a_build_is_held_by_its_servers_lease_and_failed_only_once_that_lapses(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Two servers on one etcd, each with its builder process: starting the second leaves the first's
    build alone; the first killed mid-build (its builder with it), the second fails its deploy once
    the builder's lease lapses; a server killed mid-build and restarted alone has its deploy failed
    too (by its builder stopping, or once its lease lapses). A deploy is never lost nor left
    `building`."""
    url = etcd.url(f"/t-{uuid.uuid4().hex[:8]}")
    first = Server(tmp_path / "a" / "data", etcd=url).start()
    second = Server(tmp_path / "b" / "data", etcd=url)
    try:
        deploy = first.upload(slow_app(tmp_path / "slow", 40))
        first.wait_for_build_line(deploy["id"], "importing slowly")
        key = (first.data_dir / "secret.key").read_text().strip()
        second.up_env = {"OSLESS_SECRET_KEY": key}
        second.start()
        time.sleep(5)  # the second's sweeps run meanwhile (each 2 s): the first's lease is alive
        held = deploy_status(second, deploy["id"])
        assert held["status"] == "building" and held["builder"], held

        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        failed = second.wait_for(
            lambda: (d := deploy_status(second, deploy["id"]))["status"] not in ("queued", "building") and d,
            timeout=30,
            what="the deploy failed by the other server",
        )
        assert failed["status"] == "failed" and failed["finished_at"], failed
        assert failed["error"] == ORPHANED, failed
        assert time.monotonic() - killed_at < 20

        # Alone: killed mid-build and started again, it fails its own deploy once its old lease lapses.
        again = second.upload(tmp_path / "slow")
        second.wait_for_build_line(again["id"], "importing slowly")
        second.stop(signal.SIGKILL)
        second.start()
        failed = second.wait_for(
            lambda: (d := deploy_status(second, again["id"]))["status"] not in ("queued", "building") and d,
            timeout=30,
            what="the restarted server to fail its own orphaned deploy",
        )
        assert failed["error"] in (ORPHANED, STOPPED), failed
    finally:
        second.stop()
        first.stop()


def test_a_server_cut_off_past_its_build_lease_cannot_bring_back_a_deploy_another_failed(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    """Its server stopped (as if cut off) past the builder's lease mid-build, the deploy is failed by
    the other server; running again, the build ends but releases nothing (the builder's result is
    refused), and the builder builds again under a new name, on a new lease."""
    url = etcd.url(f"/t-{uuid.uuid4().hex[:8]}")
    first = Server(tmp_path / "a" / "data", etcd=url).start()
    key = (first.data_dir / "secret.key").read_text().strip()
    second = Server(tmp_path / "b" / "data", etcd=url, up_env={"OSLESS_SECRET_KEY": key}).start()
    try:
        deploy = first.upload(slow_app(tmp_path / "slow", 20))
        first.wait_for_build_line(deploy["id"], "importing slowly")
        assert first.proc is not None
        first.proc.send_signal(signal.SIGSTOP)
        try:
            failed = second.wait_for(
                lambda: (
                    (d := deploy_status(second, deploy["id"]))["status"] not in ("queued", "building") and d
                ),
                timeout=30,
                what="the deploy failed by the other server",
            )
        finally:
            first.proc.send_signal(signal.SIGCONT)
        assert failed["error"] == ORPHANED, failed
        again = first.upload(EXAMPLES / "hello")
        # One build at a time: the next is built once the cut-off one ended (and was refused).
        done = first.wait_for(
            lambda: (d := deploy_status(first, again["id"]))["status"] not in ("queued", "building") and d,
            timeout=120,
            what="the next build",
        )
        assert done["status"] == "succeeded", done
        assert done["builder"] != failed["builder"], done  # registered anew, its lease having lapsed
        assert deploy_status(second, deploy["id"]) == failed  # as the other server wrote it
        assert second.http("GET", "/v1/apps/slow").status_code == 404  # no release came of it
        log = first.http("GET", f"/v1/deploys/{deploy['id']}/log").text
        assert f"==> Build failed: {ORPHANED}" in log and "==> Released" not in log
    finally:
        second.stop()
        first.stop()
