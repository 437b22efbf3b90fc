"""The collector, on real platforms: a short retention set through the API removes old deploys,
releases, logs, manifests and layers, and whatever serves keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from osless.api.collector import COLLECTED_KEY, Retention
from osless.api.resources import Resources
from osless.api.secrets import SecretBox
from osless.api.state import ApiState
from osless.builder import pack
from osless.contracts import App, ImageManifest
from osless.images import ImageStore, sha256_hex
from osless.store import SQLiteStore
from tests.platform import EXAMPLES, Platform, copy_app
from tests.test_deploys import APPS, set_version
from tests.test_images import manifest_fields

SHORT = {"deploys_per_app": 1, "releases_per_app": 1, "instance_logs_days": 0, "grace_s": 0}


def _layers(p: Platform) -> set[str]:
    """The layers the API holds: each as its archive, recorded under the layer's id (a builder
    uploaded it), or as a folder (built in the API's process by an earlier release)."""
    images = p.data_dir / "images"
    return {d.name for d in (images / "layers").iterdir()} | {
        f.stem for f in (images / "archived").glob("*.json")
    }


def _built(p: Platform) -> set[str]:
    """The layers in the builder process's own store (`<data dir>/builder/images`)."""
    return {d.name for d in (p.data_dir / "builder" / "images" / "layers").iterdir()}


def _archives(p: Platform) -> set[str]:
    return {f.name.removesuffix(".tar") for f in (p.data_dir / "images" / "archives").iterdir()}


def _manifests(p: Platform) -> set[str]:
    return {f.stem for f in (p.data_dir / "images" / "manifests").iterdir()}


def _release(p: Platform, app: str, version: int) -> dict[str, Any]:
    r = p.http("GET", f"/v1/apps/{app}/releases/{version}")
    assert r.status_code == 200, r.text
    release: dict[str, Any] = r.json()
    return release


def _serves(p: Platform, app: str, text: str) -> bool:
    # Short tries: the first request after a restart can wait on an instance that is not back yet.
    try:
        return httpx.get(f"{p.gateway}/{app}/", timeout=5).text == text
    except httpx.HTTPError:
        return False


def _settled(p: Platform, app: str, release: int) -> bool:
    instances = p.instances(app)
    return bool(instances) and all(
        i["release"] == release and i["status"]["phase"] == "ready" for i in instances
    )


def test_a_short_retention_collects_the_old_and_keeps_what_serves(
    own_platform: Platform, tmp_path: Path
) -> None:
    p = own_platform
    src = copy_app(APPS / "e2e_versioned", tmp_path / "versioned")
    deploys = []
    for version in ("one", "two", "three"):
        app = src / "app.py"
        app.write_text(re.sub(r'VERSION = "\w+"', f'VERSION = "{version}"', app.read_text()))
        deploys.append(p.deploy(src, "--name", "keep"))
    releases = [_release(p, "keep", int(d["release"])) for d in deploys]
    current = releases[-1]
    broken = copy_app(APPS / "e2e_broken", tmp_path / "broken")
    assert p.cli("deploy", str(broken), "--name", "flop", check=False).returncode == 1
    gone = p.deploy(EXAMPLES / "hello", "--name", "gone")
    gone_image = str(gone["image"])
    p.wait_for(lambda: p.instances("gone"), what="an instance of gone")
    assert p.http("DELETE", "/v1/apps/gone").status_code == 204  # its layers are the collector's
    p.wait_for(lambda: _settled(p, "keep", current["version"]), what="keep on its last release only")

    # A failed build uploads nothing: the broken code's layer stays in the builder's own store.
    broken_code = sha256_hex(pack(broken))
    assert broken_code not in _layers(p) and broken_code in _built(p)
    old = {r["manifest"]["layers"]["code"] for r in releases[:2]}
    old |= set(_manifest_on_disk(p, gone_image)["layers"].values())  # hello's code, and starlette
    assert old <= _layers(p) and len(old) == 4
    assert old <= _built(p)
    old_archives = {a["sha256"] for r in releases[:2] for a in r["manifest"]["layer_archives"].values()}
    assert old_archives <= _archives(p)
    assert p.http("GET", "/v1/retention").json()["releases_per_app"] == 10  # the default
    r = p.http("PUT", "/v1/retention", json=SHORT)
    assert r.status_code == 200 and r.json()["grace_s"] == 0 and r.json()["deploys_days"] == 30

    collected = p.http("POST", "/v1/retention/collect").json()
    assert collected["deploys"] == 2 and collected["releases"] == 2 and not collected["images_deferred"]
    # The four above (locks are the builder's, in its own store).
    assert (collected["layers"], collected["manifests"], collected["locks"]) == (4, 3, 0)
    assert collected["bytes_freed"] > 0
    # The builder collects its own store after the pass, by the same rules: what no kept release
    # names goes (the failed build's code too), the current release's layers stay.
    p.wait_for(lambda: not (old | {broken_code}) & _built(p), timeout=30, what="the builder's sweep")
    assert set(current["manifest"]["layers"].values()) <= _built(p)

    # Records: the newest deploy per app, the current release.
    listed = {d["id"] for d in p.http("GET", "/v1/deploys").json()["items"]}
    # gone's deploy record went with its app (DELETE removes every record of an app at once)
    assert deploys[-1]["id"] in listed and gone["id"] not in listed
    assert not {d["id"] for d in deploys[:2]} & listed
    for d in deploys[:2]:
        assert not (p.data_dir / "logs" / "deploys" / f"{d['id']}.log").exists()
    assert [r["version"] for r in p.http("GET", "/v1/apps/keep/releases").json()["items"]] == [
        current["version"]
    ]
    rollback = p.http("POST", "/v1/apps/keep/rollback", json={"to": releases[0]["version"]})
    assert rollback.status_code == 404 and rollback.json()["error"]["code"] == "release_not_found"

    # Files: the current image's layers and manifest, the logs of what runs.
    assert not old & _layers(p)
    assert set(current["manifest"]["layers"].values()) <= _layers(p)
    assert _manifests(p) == {current["image"]}
    # The layers' archives went with them; what nodes pull of the current image stays.
    assert _archives(p) == {a["sha256"] for a in current["manifest"]["layer_archives"].values()}
    assert collected["archives"] >= 2  # the code layers of keep's first two releases, at least
    live = {i["id"] for i in p.instances("keep")}
    kept_logs = {
        f.name.removesuffix(".1").removesuffix(".access").removesuffix(".log")
        for f in (p.data_dir / "logs/apps/keep").iterdir()
    }
    assert kept_logs <= live | {"egress", f"zygote-{current['image'][:12]}"} and live <= kept_logs
    assert not (p.data_dir / "logs" / "apps" / "gone").exists()

    # What serves keeps serving, from the disk too: a restart starts its zygote from the layers again.
    assert httpx.get(f"{p.gateway}/keep/").text == "three"
    p.stop()
    p.start()
    p.wait_for(lambda: _serves(p, "keep", "three"), timeout=60, what="keep to serve again")
    assert json.loads(p.cli("invoke", "keep.version").stdout) == "three"


def _manifest_on_disk(p: Platform, image: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((p.data_dir / "images" / "manifests" / f"{image}.json").read_text())
    return manifest


def test_the_collector_runs_on_its_own_at_the_interval_the_api_sets(
    own_platform: Platform, tmp_path: Path
) -> None:
    p = own_platform
    src = copy_app(APPS / "e2e_versioned", tmp_path / "versioned")
    first = p.deploy(src)
    set_version(src, "two")
    second = p.deploy(src)
    first_code = _release(p, "versioned", int(first["release"]))["manifest"]["layers"]["code"]
    p.wait_for(lambda: _settled(p, "versioned", int(second["release"])), what="the second release alone")

    bad = p.http("PUT", "/v1/retention", json={"releases_per_app": 0})
    assert bad.status_code == 422 and "releases_per_app" in bad.json()["error"]["message"]
    retention = {**SHORT, "deploys_days": 0, "interval_s": 1}
    assert p.http("PUT", "/v1/retention", json=retention).status_code == 200

    def collected() -> bool:
        versions = [r["version"] for r in p.http("GET", "/v1/apps/versioned/releases").json()["items"]]
        deploys = p.http("GET", "/v1/deploys").json()["items"]
        return versions == [second["release"]] and not deploys and first_code not in _layers(p)

    p.wait_for(collected, timeout=20, what="a pass of the collector")
    assert httpx.get(f"{p.gateway}/versioned/").text == "two"
    p.stop()
    p.start()
    assert p.http("GET", "/v1/retention").json() == {**SHORT, "deploys_days": 0, "interval_s": 1}
    p.wait_for(lambda: _serves(p, "versioned", "two"), timeout=60, what="versioned to serve again")


def test_a_build_in_flight_defers_the_sweep_and_a_young_layer_waits_its_grace(
    own_platform: Platform, tmp_path: Path
) -> None:
    p = own_platform
    gone = p.deploy(copy_app(APPS / "e2e_versioned", tmp_path / "gone"), "--name", "gone")
    orphan = str(_manifest_on_disk(p, str(gone["image"]))["layers"]["code"])
    p.wait_for(lambda: p.instances("gone"), what="an instance of gone")
    assert p.http("DELETE", "/v1/apps/gone").status_code == 204
    # The default grace (an hour) keeps a layer nothing names any more.
    assert p.http("POST", "/v1/retention/collect").json()["layers"] == 0
    assert orphan in _layers(p)

    assert p.http("PUT", "/v1/retention", json={"grace_s": 0}).status_code == 200
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "app.py").write_text("import time, osless\ntime.sleep(4)\napp = osless.App('slowbuild')\n")
    started = threading.Event()
    result: dict[str, Any] = {}

    def deploy() -> None:
        started.set()
        result.update(p.deploy(slow))

    t = threading.Thread(target=deploy)
    t.start()
    started.wait()
    p.wait_for(lambda: p.http("GET", "/v1/status").json()["builds_running"] == 1, what="the build")
    during = p.http("POST", "/v1/retention/collect").json()
    assert during["images_deferred"] and during["layers"] == 0 and orphan in _layers(p)
    assert orphan in _built(p)  # nor does the builder sweep while it builds
    t.join(60)
    assert result.get("status") == "succeeded"
    # The pass it skipped is swept once its build is done, without waiting for the next one.
    p.wait_for(lambda: orphan not in _built(p), timeout=30, what="the builder's sweep after its build")
    after = p.http("POST", "/v1/retention/collect").json()
    # gone's code, and its own empty dependency layer (dependency layers are per app).
    assert not after["images_deferred"] and after["layers"] == 2 and orphan not in _layers(p)
    release = _release(p, "slowbuild", int(result["release"]))
    assert set(release["manifest"]["layers"].values()) <= _layers(p)


def test_a_release_off_the_contract_is_kept_and_never_stops_a_pass(tmp_path: Path) -> None:
    # A newer builder's key in a rolling upgrade: the pass went on failing, nothing was ever freed.
    async def main() -> None:
        store = SQLiteStore(tmp_path / "state.db")
        await store.start()
        try:
            images = ImageStore(tmp_path / "images")
            resources = Resources(store)
            state = ApiState(
                resources, images, tmp_path, "http://127.0.0.1:1", SecretBox(Fernet.generate_key())
            )
            await state.collector.set_retention(Retention(grace_s=0))
            kept = images.put_manifest(ImageManifest.model_validate(manifest_fields(lock="x==1")))
            old = images.put_manifest(ImageManifest.model_validate(manifest_fields(app="old")))
            await resources.create_app(App(name="hello"))
            release = {"app": "hello", "version": 1, "image": kept, "description": "newer"}
            release["manifest"] = {**manifest_fields(lock="x==1"), "from_a_newer_builder": True}
            await store.put("/releases/hello/00000001", json.dumps(release).encode())
            assert (await state.collector.collect()).manifests == 1  # the old image's
            assert (await state.collector.collect()).manifests == 0  # every pass, not only the first
            assert images.has_manifest(kept) and not images.has_manifest(old)
            assert await store.get(COLLECTED_KEY) is not None
            found = await state.collector.kept()
            assert found.images == [kept] and found.locks == [sha256_hex(b"x==1")]
        finally:
            await state.http.aclose()
            await store.close()

    asyncio.run(main())
