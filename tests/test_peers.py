"""Several servers on one etcd: each serves the images (and deploy sources) built or uploaded through
another, fetched from a live peer on a miss and checked. One setup: etcd, server A (which builds),
server B (`--no-builder`), a node joined to B."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from osless.api.peers import Peers
from osless.api.replicate import MAX_FAILURES, Replicator
from osless.api.resources import Resources
from osless.api.secrets import SecretBox
from osless.images import ImageStore, canonical_json
from osless.store import SQLiteStore, open_store
from tests.etcd import EtcdCluster
from tests.platform import EXAMPLES, OSLESS, Node, Server, copy_app
from tests.test_images import manifest_fields


@dataclass
class Fleet:
    etcd: EtcdCluster
    url: str
    a: Server
    b: Server
    node: Node


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("peers")
    etcd = EtcdCluster(tmp / "etcd").start()
    url = etcd.url(f"/t-{uuid.uuid4().hex[:8]}")
    a = b = node = None
    fleet = None
    try:
        a = Server(tmp / "a" / "data", etcd=url).start()
        key = (a.data_dir / "secret.key").read_text().strip()
        b = Server(
            tmp / "b" / "data", etcd=url, args=["--no-builder"], up_env={"OSLESS_SECRET_KEY": key}
        ).start()
        node = Node(b, "n1", tmp / "n1").start()
        fleet = Fleet(etcd, url, a, b, node)
        yield fleet
    finally:
        for part in (fleet.node if fleet else node, b, a):
            if part is not None:
                part.stop()
        etcd.stop()


def put_key(url: str, key: str, value: bytes) -> None:
    async def put() -> None:
        store = open_store(url)
        await store.start()
        try:
            await store.put(key, value)
        finally:
            await store.close()

    asyncio.run(put())


def delete_key(url: str, key: str) -> None:
    async def delete() -> None:
        store = open_store(url)
        await store.start()
        try:
            await store.delete(key)
        finally:
            await store.close()

    asyncio.run(delete())


def get_key(url: str, key: str) -> bytes | None:
    async def get() -> bytes | None:
        store = open_store(url)
        await store.start()
        try:
            kv = await store.get(key)
            return None if kv is None else kv.value
        finally:
            await store.close()

    return asyncio.run(get())


class FakePeer:
    """A 'server' on record that answers each path with the bytes it is given, noting what it is shown."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        shown: list[str] = []
        self.shown = shown

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                shown.append(self.headers.get("authorization", ""))
                body = answers.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_release_built_through_one_server_runs_on_a_node_of_another(fleet: Fleet) -> None:
    deployed = fleet.a.deploy(EXAMPLES / "hello")
    assert deployed["status"] == "succeeded", deployed
    image = deployed["image"]
    fleet.b.wait_for(
        lambda: [i["status"]["phase"] for i in fleet.b.instances("hello")] == ["ready"],
        timeout=90,
        what="hello ready on the node of server B",
    )
    assert httpx.get(f"{fleet.node.gateway}/hello/", timeout=10).text == "Hello from osless!\n"
    # B fetched the image from A, and keeps it: its bytes are A's.
    assert (fleet.b.data_dir / "images" / "manifests" / f"{image}.json").read_bytes() == (
        fleet.a.data_dir / "images" / "manifests" / f"{image}.json"
    ).read_bytes()


def test_a_deploy_uploaded_to_a_server_without_a_builder_is_built_by_another(fleet: Fleet) -> None:
    deployed = fleet.b.deploy(EXAMPLES / "hello")  # B has no builder: A's claims it, and fetches the source
    assert deployed["status"] == "succeeded", deployed
    assert fleet.b.http("GET", f"/v1/deploys/{deployed['id']}/log").text.count("==> Released hello") == 1
    # Once built, no record of its source is left for peers to fetch.
    assert get_key(fleet.url, f"/sources/{deployed['id']}") is None
    # A record of a source whose deploy no longer builds (its app deleted meanwhile) goes at the next
    # collection; one just written (its deploy about to be queued) stays.
    put_key(fleet.url, "/sources/d-stale", json.dumps({"server": "x", "sha256": "0" * 64, "at": 0}).encode())
    put_key(
        fleet.url, "/sources/d-fresh", json.dumps({"server": "x", "sha256": "0" * 64, "at": 2e9}).encode()
    )
    assert fleet.b.http("POST", "/v1/retention/collect").status_code == 200
    assert get_key(fleet.url, "/sources/d-stale") is None and get_key(fleet.url, "/sources/d-fresh")
    # A node pulls images, never an app's source.
    node = {"authorization": f"Bearer {fleet.node.token}"}
    r = httpx.get(f"{fleet.b.api}/v1/sources/{deployed['id']}", headers=node, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text


def test_a_server_listening_on_every_address_must_say_where_peers_reach_it(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            OSLESS,
            "server",
            "--etcd",
            "etcd://127.0.0.1:1/x",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--advertise-url" in r.stdout + r.stderr, (r.stdout, r.stderr)


def test_a_peer_copy_with_other_bytes_is_refused_and_a_peer_shown_a_peer_token(fleet: Fleet) -> None:
    good = canonical_json(manifest_fields(app="ghost"))
    good_digest = hashlib.sha256(good).hexdigest()
    bad_digest = hashlib.sha256(b"something else").hexdigest()
    # Its digest matches, but it is no manifest: an egress host past a DNS name's 253 characters.
    hostile = canonical_json(manifest_fields(app="ghost", egress=["a" * 300]))
    hostile_digest = hashlib.sha256(hostile).hexdigest()
    peer = FakePeer(
        {
            f"/v1/images/{bad_digest}": good,
            f"/v1/images/{good_digest}": good,
            f"/v1/images/{hostile_digest}": hostile,
        }
    )
    try:
        put_key(fleet.url, "/servers/zz-fake", json.dumps({"url": peer.url}).encode())
        for digest in (bad_digest, hostile_digest):
            r = fleet.b.http("GET", f"/v1/images/{digest}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found", r.text
            assert not (fleet.b.data_dir / "images" / "manifests" / f"{digest}.json").exists()
        r = fleet.b.http("GET", f"/v1/images/{good_digest}")  # the same peer, bytes that fit: kept
        assert r.status_code == 200 and r.content == good, r.text
        assert peer.shown and all(s.startswith("Bearer oslp_") for s in peer.shown), peer.shown
        assert fleet.b.token not in "".join(peer.shown)
        token = peer.shown[-1].removeprefix("Bearer ")
        # It reads images from a server, and nothing else.
        who = httpx.get(f"{fleet.a.api}/v1/whoami", headers={"authorization": f"Bearer {token}"})
        assert who.status_code == 403, who.text
        apps = httpx.get(f"{fleet.a.api}/v1/apps", headers={"authorization": f"Bearer {token}"})
        assert apps.status_code == 403, apps.text
    finally:
        delete_key(fleet.url, "/servers/zz-fake")  # a server gone: no longer asked
        peer.close()


def holds(server: Server, image: str) -> bool:
    """Whether `server` has image `image` whole on its disk: the manifest and each layer archive."""
    images = server.data_dir / "images"
    path = images / "manifests" / f"{image}.json"
    if not path.is_file():
        return False
    archives = json.loads(path.read_bytes())["layer_archives"].values()
    return all((images / "archives" / f"{a['sha256']}.tar").is_file() for a in archives)


def test_with_the_server_that_built_it_gone_a_release_still_runs_and_scales_up(
    fleet: Fleet, tmp_path: Path
) -> None:
    image = fleet.b.http("GET", "/v1/apps/hello").json()["current_image"]
    # A release no node pulls through B (its one node is away): B copies it anyway, from A.
    fleet.node.stop()
    src = copy_app(EXAMPLES / "hello", tmp_path / "hello2")
    (src / "app.py").write_text((src / "app.py").read_text() + "\n# another release\n")
    deployed = fleet.a.deploy(src, "--name", "hello2", "--detach")
    assert deployed["status"] == "succeeded", deployed
    fleet.b.wait_for(lambda: holds(fleet.b, deployed["image"]), timeout=30, what="B to copy hello2's image")
    fleet.a.stop(signal.SIGKILL)
    fleet.node = Node(fleet.b, "n1", fleet.node.data_dir, http_port=fleet.node.http_port).start()
    fleet.b.wait_for(
        lambda: [i["status"]["phase"] for i in fleet.b.instances("hello2")] == ["ready"],
        timeout=90,
        what="hello2 ready on the node, pulled through B",
    )
    assert httpx.get(f"{fleet.node.gateway}/hello2/", timeout=10).text == "Hello from osless!\n"
    assert fleet.b.http("GET", f"/v1/images/{image}").status_code == 200
    layers = fleet.b.http("GET", f"/v1/images/{image}/layers").json()["layers"]
    for archive in layers.values():
        r = fleet.b.http("GET", f"/v1/layers/{archive['sha256']}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == archive["sha256"]
    fleet.b.cli("scale", "hello", "--min", "2")
    fleet.b.wait_for(
        lambda: [i["status"]["phase"] for i in fleet.b.instances("hello")] == ["ready", "ready"],
        timeout=90,
        what="two instances of hello ready",
    )

    # With A gone, no builder runs (B has none): a deploy waits queued, never failed for it, and
    # says why, on the record and once in `osless deploy`'s output.
    cli = subprocess.Popen(
        [OSLESS, "deploy", str(EXAMPLES / "hello"), "--name", "hello3"],
        env=fleet.b.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def waiting() -> list[dict[str, Any]]:
            items = fleet.b.http("GET", "/v1/deploys").json()["items"]
            return [d for d in items if d["app"] == "hello3" and (d["reason"] or "").startswith("no builder")]

        queued = fleet.b.wait_for(waiting, timeout=30, what="hello3's deploy to say no builder runs")[0]
        assert queued["status"] == "queued", queued
        assert fleet.b.http("GET", f"/v1/deploys/{queued['id']}").json()["reason"] == (
            "no builder is running; start one with `osless builder --api URL`"
        )
        time.sleep(4)  # the CLI looks every 3 s
        assert cli.poll() is None  # still waiting
    finally:
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=10)
    said = f"queued: no builder is running; start one with `osless builder --api {fleet.b.api}`"
    assert err.count(said) == 1, err


def test_a_copy_that_keeps_failing_is_set_aside_and_tried_again_when_a_server_appears(tmp_path: Path) -> None:
    # It was asked for every 60 s forever (each time up to the cap from every peer); and one no peer
    # held was given up for good, even once its holder was back.
    good = canonical_json(manifest_fields(app="ghost"))
    digest = hashlib.sha256(good).hexdigest()
    huge = canonical_json(
        manifest_fields(
            app="huge",
            layer_archives={
                "code": {"sha256": "a" * 64, "size": 10},
                "deps": {"sha256": "b" * 64, "size": 1 << 30},
            },
        )
    )
    huge_digest = hashlib.sha256(huge).hexdigest()
    bad = FakePeer({f"/v1/images/{digest}": b"other bytes", f"/v1/images/{huge_digest}": huge})
    archives = {f"/v1/layers/{hashlib.sha256(b).hexdigest()}": b for b in (b"code", b"deps")}
    mended = FakePeer({f"/v1/images/{digest}": good, **archives})

    async def main() -> tuple[int, int, bool, bool]:
        store = SQLiteStore(tmp_path / "state.db")
        await store.start()
        http = httpx.AsyncClient()
        images = ImageStore(tmp_path / "images")
        peers = Peers(store, SecretBox(Fernet.generate_key()), http, "me", images, 1 << 20, 1 << 20)
        replicas = Replicator(Resources(store), peers, images, lambda d: tmp_path / d, first_retry_s=0.02)
        await store.put("/servers/zz-bad", json.dumps({"url": bad.url}).encode())
        task = asyncio.create_task(replicas.run())
        try:
            replicas._want(("image", digest))
            replicas._want(("image", huge_digest))  # its deps archive past the cap: refused at once
            for _ in range(200):
                await asyncio.sleep(0.05)
                if ("image", digest) in replicas._set_aside:
                    break
            await asyncio.sleep(1.0)  # nothing more asked meanwhile
            asked = len(bad.shown)
            await store.put("/servers/zz-mended", json.dumps({"url": mended.url}).encode())
            for _ in range(200):
                await asyncio.sleep(0.05)
                if images.has_image(digest):
                    break
            return asked, len(bad.shown), images.has_image(digest), images.has_manifest(huge_digest)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await http.aclose()
            await store.close()

    try:
        asked, later, whole, huge_manifest = asyncio.run(main())
    finally:
        bad.close()
        mended.close()
    assert asked == MAX_FAILURES + 1  # five tries of the image, one of the huge manifest (no archive)
    assert huge_manifest and whole
    assert later > asked  # tried again (from both) once a server appeared
