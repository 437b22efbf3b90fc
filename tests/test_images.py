"""Images across nodes: the node pulls manifests and layer archives from the API by digest, checks
each sha256, refuses what does not match, caches what does, and collects what nothing uses.

An image of the previous release's format (no archive digests in its manifest) is started from a
real data dir of that release in tests/test_migrations.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import stat
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import osless
from osless import contracts
from osless.client import AsyncApi
from osless.contracts import ImageManifest
from osless.images import (
    ImageStore,
    UidFolders,
    canonical_json,
    collect_uid_folders,
    manifest_json,
    remove_tree,
    sha256_hex,
)
from osless.node.images import LayerRefused, NodeImages
from osless.sdk import app as sdk_app
from osless.sdk.app import read_app_manifest
from osless.sdk.config import KEY_RE
from tests.platform import EXAMPLES, Platform
from tests.test_auth import call, make_token


def manifest_fields(**changes: Any) -> dict[str, Any]:
    """The keys of a valid image manifest (as a build writes them), with `changes` made."""
    code, deps = sha256_hex(b"code"), sha256_hex(b"deps")
    fields: dict[str, Any] = {
        "schema": 1,
        "app": "hello",
        "entry": "app",
        "python": "3.11",
        "layers": {"code": code, "deps": deps},
        "layer_archives": {"code": {"sha256": code, "size": 10}, "deps": {"sha256": deps, "size": 10}},
        "lock": "",
        "functions": {"greet": {"memory_mb": 256, "timeout_s": 30.0, "async": False}},
        "web": None,
        "volumes": {},
        "egress": [],
        "config": {},
    }
    fields.update(changes)
    return fields


def _cache(p: Platform) -> Path:
    return p.data_dir / "node" / "images"


def _release(p: Platform, app: str) -> dict[str, Any]:
    release: dict[str, Any] = p.http("GET", f"/v1/apps/{app}").json()["release"]
    return release


def _tree(top: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under `top`: its mode, and its content or link target."""
    found: dict[str, tuple[int, bytes]] = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            body = os.readlink(path).encode()
        else:
            body = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(top))] = (st.st_mode, body)
    return found


def test_a_deploy_runs_from_layers_the_node_pulled_and_checked(
    platform: Platform, hello: dict[str, object]
) -> None:
    release = _release(platform, "hello")
    image, manifest = release["image"], release["manifest"]
    # The manifest in the node's cache is the API's, byte for byte, and its sha256 is the image digest.
    cached = (_cache(platform) / "manifests" / f"{image}.json").read_bytes()
    assert sha256_hex(cached) == image and json.loads(cached) == manifest
    assert set(manifest["layer_archives"]) == {"code", "deps"}
    for name, archive in manifest["layer_archives"].items():
        served = (platform.data_dir / "images" / "archives" / f"{archive['sha256']}.tar").read_bytes()
        assert sha256_hex(served) == archive["sha256"] and len(served) == archive["size"]
        # Unpacked and sealed on the node, named by that sha256: the very tree the build made.
        layer = _cache(platform) / "layers" / archive["sha256"]
        assert stat.S_IMODE(layer.stat().st_mode) == 0o555
        assert _tree(layer) == _tree(
            platform.data_dir / "builder" / "images" / "layers" / manifest["layers"][name]
        )
    assert list((_cache(platform) / "tmp").iterdir()) == []
    assert httpx.get(f"{platform.gateway}/hello/", timeout=30).text == "Hello from osless!\n"


def test_the_image_routes_serve_nodes_only(platform: Platform, hello: dict[str, object]) -> None:
    release = _release(platform, "hello")
    image, manifest = release["image"], release["manifest"]
    code = manifest["layer_archives"]["code"]
    r = platform.http("GET", f"/v1/images/{image}")
    assert r.status_code == 200 and sha256_hex(r.content) == image
    assert r.headers["content-type"] == "application/json"
    r = platform.http("GET", f"/v1/layers/{code['sha256']}")
    assert r.status_code == 200 and sha256_hex(r.content) == code["sha256"]
    assert (
        int(r.headers["content-length"]) == code["size"] and r.headers["content-type"] == "application/x-tar"
    )
    r = platform.http("GET", f"/v1/images/{image}/layers")
    assert r.status_code == 200 and r.json() == {"layers": manifest["layer_archives"]}

    paths = [f"/v1/images/{image}", f"/v1/images/{image}/layers", f"/v1/layers/{code['sha256']}"]
    for role in ("read", "deploy"):
        token = make_token(platform, role)["token"]
        for path in paths:
            r = call(platform, token, "GET", path)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (role, path, r.text)
    # A node pulls only what is placed on it: an image holds its app's code.
    stranger = platform.cli_json("tokens", "create", "--role", "node", "--name", "node:stranger")["token"]
    for path in paths:
        r = call(platform, stranger, "GET", path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_placed", (path, r.text)
    here = next(i["node"] for i in platform.instances("hello") if i["image"] == image)
    mine = platform.cli_json("tokens", "create", "--role", "node", "--name", f"node:{here}")["token"]
    for path in paths:
        assert call(platform, mine, "GET", path).status_code == 200, path

    unknown = "0" * 64
    for path, code_ in (
        (f"/v1/images/{unknown}", "image_not_found"),
        (f"/v1/images/{unknown}/layers", "image_not_found"),
        (f"/v1/layers/{unknown}", "layer_not_found"),
    ):
        r = platform.http("GET", path)
        assert r.status_code == 404 and r.json()["error"]["code"] == code_, r.text
        assert unknown in r.json()["error"]["message"]
    for bad in ("xyz", image.upper(), image + "0", "." * 64):
        for path in (f"/v1/images/{bad}", f"/v1/images/{bad}/layers", f"/v1/layers/{bad}"):
            r = platform.http("GET", path)
            assert r.status_code == 422 and "64" in r.json()["error"]["message"], (path, r.text)


def test_a_corrupted_layer_is_refused_and_a_good_one_then_runs(own_platform: Platform) -> None:
    p = own_platform
    p.deploy(EXAMPLES / "hello")
    release = _release(p, "hello")
    image, sha = release["image"], release["manifest"]["layer_archives"]["code"]["sha256"]
    p.stop()
    # A node that never had the layer, and the API's archive of it damaged on disk (same size).
    remove_tree(_cache(p) / "layers" / sha)
    archive = p.data_dir / "images" / "archives" / f"{sha}.tar"
    good = archive.read_bytes()
    bad = good.replace(b"Hello from osless!", b"Hello from 0sless!")
    assert bad != good and len(bad) == len(good)
    archive.chmod(0o600)
    archive.write_bytes(bad)
    p.start()

    why = f"layer {sha} of image {image} is corrupt: expected sha256 {sha}, got {sha256_hex(bad)}; refused"

    def refused() -> bool:
        return any(
            why in str((i["status"].get("last_exit") or {}).get("reason")) for i in p.instances("hello")
        )

    p.wait_for(refused, timeout=60, what="the instance to say its layer was refused")
    logged = [json.loads(line) for line in p.cli("logs", "hello", "--json").stdout.splitlines()]
    assert any(r["line"] == why and r["source"] == "images" for r in logged)  # in the app's own logs too
    assert not (_cache(p) / "layers" / sha).exists()
    # Nothing of a refused download is left behind; the instance's next try may be pulling it again
    # meanwhile (a CI run saw its file there), so the folder is empty between tries.
    p.wait_for(lambda: list((_cache(p) / "tmp").iterdir()) == [], timeout=30, what="no download left")
    assert not any(i["status"]["phase"] == "ready" for i in p.instances("hello"))

    # The good bytes back: the instance's next try pulls them and runs.
    archive.write_bytes(good)
    p.wait_for(
        lambda: any(i["status"]["phase"] == "ready" for i in p.instances("hello")), timeout=60, what="ready"
    )
    assert httpx.get(f"{p.gateway}/hello/", timeout=30).text == "Hello from osless!\n"
    assert (_cache(p) / "layers" / sha).is_dir()


def test_an_sdk_app_s_manifest_keeps_to_the_contract_and_dumps_as_it_was_written() -> None:
    # The contract restates the SDK's rules (contracts imports nothing of osless): they must agree.
    assert (contracts.MIN_MEMORY_MB, contracts.MAX_MEMORY_MB) == (
        sdk_app.MIN_MEMORY_MB,
        sdk_app.MAX_MEMORY_MB,
    )
    assert (contracts.MIN_VOLUME_MB, contracts.MAX_VOLUME_MB) == (
        sdk_app.MIN_VOLUME_MB,
        sdk_app.MAX_VOLUME_MB,
    )
    assert sdk_app.FUNCTION_RE.pattern == contracts.FUNCTION_NAME_PATTERN
    assert sdk_app.VOLUME_RE.pattern == contracts.VOLUME_NAME_PATTERN
    assert sdk_app.HOST_RE.pattern == contracts.HOST_PATTERN
    assert KEY_RE.pattern == contracts.CONFIG_KEY_PATTERN
    app = osless.App("shop", volumes={"/data": osless.Volume("orders", size_mb=64)}, egress=["*.example.com"])
    app.function(name="quick", memory_mb=128, timeout_s=5)(lambda event, ctx: None)
    app.function(name="slow", memory_mb=512, timeout_s=90.5)(lambda event, ctx: None)

    @app.web(memory_mb=1024, max_duration_s=60)
    def site() -> None: ...

    app.config(
        greeting=osless.Field(str, default="hi", doc="what it says"),
        ratio=osless.Field(float, default=1),
        extra=osless.Field(osless.JSON, default=None, restart=True),
        password=osless.Secret,
    )
    declared = read_app_manifest({**app.manifest(), "web": {**app.manifest()["web"], "kind": "asgi"}})
    fields = manifest_fields(
        app="shop", **{k: declared[k] for k in ("functions", "web", "volumes", "egress", "config")}
    )
    manifest = ImageManifest.model_validate(fields)
    assert manifest.memory_mb() == 1024 and manifest.functions["slow"].timeout_s == 90.5
    assert manifest.config["extra"].default is None and "default" not in manifest.config_schema()["password"]
    # Numbers keep their JSON type (5 stays 5), absent keys stay absent: the very bytes, both ways.
    assert manifest_json(manifest) == canonical_json(fields)
    assert manifest_json(ImageManifest.model_validate_json(canonical_json(fields))) == canonical_json(fields)
    old = manifest_fields(volumes={"/data": "db"})  # the release before archives and volume sizes
    del old["layer_archives"]
    assert manifest_json(ImageManifest.model_validate_json(canonical_json(old))) == canonical_json(old)


def test_a_manifest_off_its_contract_is_refused_by_the_node_naming_the_field(
    platform: Platform, tmp_path: Path
) -> None:
    # The app's own process printed part of the manifest at build time: what the node reads from it
    # (memory limits, volumes, egress, entry) is held to the contract even when its digest matches.
    function = {"memory_mb": 256, "timeout_s": 30, "async": False}
    off = {
        "functions.greet.memory_mb: Input should be a valid integer": manifest_fields(
            functions={"greet": {**function, "memory_mb": "256"}}
        ),
        "functions.greet.memory_mb: Input should be less than or equal to 65536": manifest_fields(
            functions={"greet": {**function, "memory_mb": 1 << 20}}
        ),
        "egress.0: String should have at most 253 characters": manifest_fields(egress=["a" * 300]),
        "config.key.doc: String should have at most 2000 characters": manifest_fields(
            config={"key": {"type": "str", "required": True, "restart": False, "doc": "d" * 5000}}
        ),
        "entry: String should match pattern": manifest_fields(entry="../../etc"),
        "gpu: Extra inputs are not permitted": manifest_fields(gpu=True),
        "schema: Input should be 1": manifest_fields(schema=2),
    }
    store = ImageStore(platform.data_dir / "images")

    def stored(fields: dict[str, Any]) -> str:
        data = canonical_json(fields)
        digest = sha256_hex(data)
        (store.manifests_dir / f"{digest}.json").write_bytes(data)  # as a tampered image store holds it
        return digest

    async def run() -> None:
        api = AsyncApi(platform.api, platform.token)
        try:
            images = NodeImages(api, tmp_path / "cache")
            for problem, fields in off.items():
                image = stored(fields)
                with pytest.raises(LayerRefused) as refused:
                    await images.manifest(image)
                message = str(refused.value)
                assert message.startswith(f"the manifest of image {image} is refused: "), message
                assert problem in message and len(message) < 1000, message
                assert "a" * 300 not in message and "d" * 300 not in message  # named, not echoed
                assert not list(images.manifests_dir.iterdir())
            # One that keeps to it is read into the contract, and kept byte for byte.
            image = stored(manifest_fields())
            manifest = await images.manifest(image)
            assert isinstance(manifest, ImageManifest) and manifest.app == "hello"
            assert manifest.functions["greet"].memory_mb == 256 and manifest.memory_mb() == 256
            kept = (images.manifests_dir / f"{image}.json").read_bytes()
            assert kept == canonical_json(manifest_fields()) == manifest_json(manifest)
        finally:
            await api.aclose()

    asyncio.run(run())


def test_concurrent_needs_share_one_pull_and_unused_layers_are_collected(
    platform: Platform, hello: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = _release(platform, "hello")
    image, archives = release["image"], release["manifest"]["layer_archives"]

    async def run() -> None:
        api = AsyncApi(platform.api, platform.token)
        try:
            images = NodeImages(api, tmp_path / "cache", grace_s=3600)
            with caplog.at_level(logging.INFO, logger="osless.node.images"):
                found = await asyncio.gather(*(images.layers(image) for _ in range(4)))
            assert all(f == found[0] for f in found)
            assert {p.name for p in found[0].values()} == {a["sha256"] for a in archives.values()}
            pulls = [r for r in caplog.records if r.getMessage().startswith("pulled layer")]
            assert len(pulls) == 2  # one per layer, however many asked at once

            # In use, or unused for less than the grace period: kept.
            assert await images.collect({image}) == (0, 0)
            assert await images.collect(set()) == (0, 0)
            images.grace_s = 0
            assert await images.collect({image}) == (0, 0)
            assert await images.collect(set()) == (1, 2)
            assert not list(images.layers_dir.iterdir()) and not list(images.manifests_dir.iterdir())
            assert list(images.tmp_dir.iterdir()) == []
        finally:
            await api.aclose()

    asyncio.run(run())


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info, b"planted"


def _past_path_max(outside: Path) -> bytes:
    """CVE-2025-4517: links whose chain is longer than PATH_MAX, which `realpath` (and so tarfile's
    `data` filter before Python 3.11.13) does not resolve; the last one leads out, and a file is
    written through it."""
    comp, steps, path, members = "d" * 247, "abcdefghijklmnop", "", []
    for step in steps:
        members += [
            _member(f"{path}{comp}", tarfile.DIRTYPE),
            _member(f"{path}{step}", tarfile.SYMTYPE, comp),
        ]
        path += comp + "/"
    top = "/".join(steps) + "/" + "l" * 254
    members.append(_member(top, tarfile.SYMTYPE, "../" * len(steps)))
    members.append(_member("escape", tarfile.SYMTYPE, top + "/" + "../" * 64 + str(outside).lstrip("/")))
    members.append(_member("escape/escaped"))
    return _tar(*members)


def test_an_archive_reaching_out_of_its_layer_is_refused_though_its_digest_matches(
    platform: Platform, tmp_path: Path
) -> None:
    # What a tampered image store could serve, with a manifest that names it: the digests match,
    # the unpacking still refuses it and writes nothing outside the layer.
    store = ImageStore(platform.data_dir / "images")
    hostile = {
        "a path up": _tar(_member("../../escaped")),
        "an absolute path": _tar(_member(str(tmp_path / "escaped"))),
        "a link out": _tar(_member("out", tarfile.SYMTYPE, "/"), _member("out" + str(tmp_path / "escaped"))),
        "a link up": _tar(_member("up", tarfile.SYMTYPE, "../..")),
        "a hard link": _tar(_member("hard", tarfile.LNKTYPE, "/etc/passwd")),
        "a device": _tar(_member("dev", tarfile.CHRTYPE)),
        "a file through a link": _tar(
            _member("sub", tarfile.DIRTYPE), _member("in", tarfile.SYMTYPE, "sub"), _member("in/f")
        ),
        "a link up through a link": _tar(
            _member("here", tarfile.SYMTYPE, "."), _member("x", tarfile.SYMTYPE, "here/../..")
        ),
        "a link chain past PATH_MAX": _past_path_max(tmp_path / "outside"),
    }
    (tmp_path / "outside").mkdir()

    async def run() -> None:
        api = AsyncApi(platform.api, platform.token)
        try:
            images = NodeImages(api, tmp_path / "node" / "cache")
            for what, data in hostile.items():
                sha = sha256_hex(data)
                store.archive_path(sha).write_bytes(data)
                archive = {"sha256": sha, "size": len(data)}
                fields = manifest_fields(
                    layers={"code": sha, "deps": sha}, layer_archives={"code": archive, "deps": archive}
                )
                image = store.put_manifest(ImageManifest.model_validate(fields))
                with pytest.raises(LayerRefused, match=f"layer {sha} cannot be unpacked"):
                    await images.layers(image)
                assert not list(images.layers_dir.iterdir()) and not list(images.tmp_dir.iterdir()), what
        finally:
            await api.aclose()

    asyncio.run(run())
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "node" / "escaped").exists()


def test_a_manifest_landing_mid_sweep_keeps_the_archive_it_names(tmp_path: Path) -> None:
    # Review probe (issue 11): the keep list was built once, so an image copied during the sweep lost
    # the deps archive it shares with an image the pass removes.
    store = ImageStore(tmp_path / "images")
    deps, code1, code2 = sha256_hex(b"deps"), sha256_hex(b"code1"), sha256_hex(b"code2")
    for sha in (deps, code1, code2):
        store.archive_path(sha).write_bytes(b"tar")
    ref = {"sha256": deps, "size": 3}

    def image(code: str) -> ImageManifest:
        fields = manifest_fields(
            layers={"code": code, "deps": deps},
            layer_archives={"code": {"sha256": code, "size": 3}, "deps": ref},
        )
        return ImageManifest.model_validate(fields)

    store.put_manifest(image(code1))  # released once, kept no more
    landed: list[str] = []

    def busy() -> bool:  # called under the store's lock at the first removal: a copy lands then
        if not landed:
            data = manifest_json(image(code2))
            landed.append(sha256_hex(data))
            (store.manifests_dir / f"{landed[0]}.json").write_bytes(data)
        return False

    found = store.collect(keep_images=set(), keep_locks=set(), grace_s=0.0, busy=busy)
    assert found.manifests == 1 and not found.stopped
    assert store.has_image(landed[0])  # its deps archive (shared) and its code archive are still there
    assert not store.archive_path(code1).exists()


def test_a_uid_folder_a_build_uses_is_never_swept_and_a_build_waits_out_a_sweep(tmp_path: Path) -> None:
    # A name whose first deploy failed has a uid no app has: its next build reuses it, and the sweep
    # (its busy() checked before) must not take the uv cache from under that build.
    cache = tmp_path / "uv"
    (cache / "4242").mkdir(parents=True)
    (cache / "4242" / "wheel").write_bytes(b"x" * 100)
    os.utime(cache / "4242", (0, 0))  # long past the grace
    uids = UidFolders()
    with uids.using(4242):
        assert collect_uid_folders([cache], live=(), grace_s=1, in_use=uids) == 0
        assert (cache / "4242" / "wheel").is_file()
    # A build starting while the sweep removes them waits, then finds them gone (made anew).
    started = threading.Event()
    seen: list[bool] = []

    def build() -> None:
        started.set()
        with uids.using(4242):
            seen.append((cache / "4242").exists())

    with uids.sweeping("4242") as free:
        assert free
        t = threading.Thread(target=build)
        t.start()
        started.wait()
        time.sleep(0.2)
        assert not seen  # still waiting
        remove_tree(cache / "4242")
    t.join(timeout=10)
    assert seen == [False]


def test_a_kept_manifest_keeps_the_archives_it_names_whatever_the_layer_records_say(tmp_path: Path) -> None:
    # Two builds of one layer id need not make the same bytes (another builder, a wiped cache): the
    # layer's record names the first archive, and the second image's own archive must stay all the same.
    store = ImageStore(tmp_path / "images")
    code, deps, first, second = (sha256_hex(b) for b in (b"code", b"deps", b"first", b"second"))
    for sha in (code, first, second):
        store.archive_path(sha).write_bytes(b"tar")
    (store.archived_dir / f"{deps}.json").write_text(json.dumps({"sha256": first, "size": 3}))
    fields = manifest_fields(
        layers={"code": code, "deps": deps},
        layer_archives={"code": {"sha256": code, "size": 3}, "deps": {"sha256": second, "size": 3}},
    )
    image = store.put_manifest(ImageManifest.model_validate(fields))
    found = store.collect(keep_images={image}, keep_locks=set(), grace_s=0.0)
    assert not found.stopped
    assert store.has_image(image)  # `second`, named by the kept manifest, is still there
