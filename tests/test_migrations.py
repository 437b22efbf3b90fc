"""Upgrades: a data dir made by the previous release, for real, then used by this code.

The previous release (eeff47b: apps without a uid of record) is built once per session from git into a
virtualenv of its own; its `osless up` deploys apps, sets config and secrets, writes to a volume, and
stops. Each test starts from a copy of that data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from osless.api.auth import TokenRecord
from osless.api.migrations import KEEP_BACKUPS, LATEST, SCHEMA_FILE, SCHEMA_KEY, Paths, backup_sqlite, migrate
from osless.api.models import App, AppStatus, ConfigChange, ConfigState, Deploy, Instance, Node, Release
from osless.api.resources import UID_BASE
from osless.contracts import ImageManifest
from osless.images import manifest_json
from osless.node.agent import run_dir_for
from osless.store import SQLiteStore
from tests.platform import EXAMPLES, ROOT, Platform, copy_app
from tests.test_volumes import put_away

PREVIOUS = "eeff47b"  # the last release before schema versions were recorded
APPS = Path(__file__).parent / "apps"
OLD_APPS = {"hello", "flask-demo", "configured", "notes"}
MODELS: dict[str, type[BaseModel]] = {
    "/apps/": App,
    "/appstatus/": AppStatus,
    "/releases/": Release,
    "/deploys/": Deploy,
    "/instances/": Instance,
    "/nodes/": Node,
    "/config/": ConfigState,
    "/confighistory/": ConfigChange,
    "/tokens/": TokenRecord,
}


@pytest.fixture(scope="session")
def previous_osless(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The previous release's `osless`, installed from git into a virtualenv of its own."""
    root = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    uv = str(Path(sys.executable).parent / "uv")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(root / ".venv")], check=True)
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(root / ".venv/bin/python"), str(root)], check=True
    )
    return str(root / ".venv" / "bin" / "osless")


def hello_v2(dest: Path) -> Path:
    """examples/hello saying something else, to tell its releases apart."""
    app = copy_app(EXAMPLES / "hello", dest)
    code = (app / "app.py").read_text()
    (app / "app.py").write_text(code.replace("Hello from osless!", "Hello from osless, v2!"))
    return app


@pytest.fixture(scope="session")
def previous_data_dir(tmp_path_factory: pytest.TempPathFactory, previous_osless: str) -> Path:
    """A data dir as the previous release leaves it: hello (v1, v2), flask, config with a secret, a volume."""
    # A short name: its run dir must fit inside it (`run_dir_for`), under pytest-xdist's longer paths too.
    root = tmp_path_factory.mktemp("prev")
    p = Platform(root / "data", osless=previous_osless).start(timeout=60)
    try:
        assert p.deploy(EXAMPLES / "hello")["release"] == 1
        assert p.deploy(hello_v2(root / "hello-v2"))["release"] == 2
        p.deploy(EXAMPLES / "flask")
        p.deploy(APPS / "configured")
        p.cli("config", "set", "configured", "greeting=hi", "db_password=s3cret")
        p.deploy(APPS / "volume_plain")
        assert p.invoke("notes", "put", {"name": "note", "text": "kept"}) == (200, "stored")
        assert p.invoke("configured", "read")[1]["greeting"] == "hi"
    finally:
        p.stop()
    return p.data_dir


@pytest.fixture
def upgraded(tmp_path_factory: pytest.TempPathFactory, previous_data_dir: Path) -> Path:
    """A copy of the previous release's data dir, at a path as short as its own: its run dir is inside
    it too, as in an upgrade in place. cp -a: the volumes' files keep their owners (the old uids)."""
    dest = tmp_path_factory.mktemp("up") / "data"
    subprocess.run(["cp", "-a", str(previous_data_dir), str(dest)], check=True)
    assert run_dir_for(dest) == dest / "run"
    return dest


def read_store(data_dir: Path) -> dict[str, Any]:
    """Every record of a stopped platform's store, as JSON, through the store itself."""

    async def read() -> dict[str, Any]:
        async with SQLiteStore(data_dir / "state.db") as store:
            items, _ = await store.list("/")
            return {kv.key: json.loads(kv.value) for kv in items}

    return asyncio.run(read())


def ready(p: Platform, app: str, uid: int) -> bool:
    return any(i["status"]["phase"] == "ready" and i["status"]["uid"] == uid for i in p.instances(app))


def gateway_text(p: Platform, path: str) -> str:
    r = httpx.get(p.gateway + path, timeout=30)
    return r.text if r.status_code == 200 else f"{r.status_code}: {r.text}"


def test_the_previous_release_s_data_dir_serves_after_the_upgrade(upgraded: Path, tmp_path: Path) -> None:
    data = upgraded
    p = Platform(data).start(timeout=60)
    try:
        # Every app has a uid of its own; its instances carry it and run.
        apps = {a["name"]: a for a in p.http("GET", "/v1/apps").json()["items"]}
        assert set(apps) == OLD_APPS
        uids = {name: a["uid"] for name, a in apps.items()}
        assert all(isinstance(u, int) and u >= UID_BASE for u in uids.values()), uids
        assert len(set(uids.values())) == len(uids)
        for app, uid in uids.items():
            p.wait_for(lambda app=app, uid=uid: ready(p, app, uid), timeout=60, what=f"{app} to run")
        listed = p.cli_json("ps")
        assert {i["app"] for i in listed if i["status"]["phase"] == "ready"} == OLD_APPS
        # Their images carry no layer archives: the API made them on the node's first ask, and the
        # node pulled and checked them against those (tests/test_images.py has the rest).
        for image in {i["image"] for i in listed}:
            manifest = json.loads((data / "images" / "manifests" / f"{image}.json").read_bytes())
            assert "layer_archives" not in manifest
            archives = p.http("GET", f"/v1/images/{image}/layers").json()["layers"]
            for name, layer in manifest["layers"].items():
                made = json.loads((data / "images" / "archived" / f"{layer}.json").read_bytes())
                assert (
                    made == archives[name] and (data / "node" / "images" / "layers" / made["sha256"]).is_dir()
                )
        assert all(i["uid"] == uids[i["app"]] for i in listed)

        # Web and functions, config and secrets, a volume's data: all as the previous release left them.
        assert gateway_text(p, "/hello/") == "Hello from osless, v2!\n"
        assert gateway_text(p, "/flask-demo/") == "Hello from Flask on osless!\n"
        status, body = p.invoke("hello", "greet", {"name": "upgrade"})
        assert (status, body["message"]) == (200, "Hello, upgrade!")
        config = p.cli_json("config", "get", "configured")
        assert config["values"] == {"greeting": "hi", "db_password": "********"}
        assert p.invoke("configured", "read")[1]["greeting"] == "hi"
        assert p.invoke("configured", "password_digest")[1] == hashlib.sha256(b"s3cret").hexdigest()
        assert p.invoke("notes", "get", {"name": "note"}) == (200, "kept")
        assert p.invoke("notes", "put", {"name": "note", "text": "still mine"}) == (200, "stored")

        # Releases: the previous release's both, a rollback to its first, and a deploy by this code.
        assert [r["version"] for r in p.cli_json("releases", "hello")] == [2, 1]
        p.cli("rollback", "hello", "--to", "1")
        p.wait_for(lambda: gateway_text(p, "/hello/") == "Hello from osless!\n", timeout=60, what="v1")
        newest = max(r["version"] for r in p.cli_json("releases", "hello"))
        assert p.deploy(hello_v2(tmp_path / "hello-again"))["release"] == newest + 1
        p.wait_for(
            lambda: gateway_text(p, "/hello/") == "Hello from osless, v2!\n",
            timeout=60,
            what="the new release",
        )
        assert p.http("GET", "/v1/apps/hello").json()["uid"] == uids["hello"]

        # Migrated once, and the store copied before it changed: the backup is the previous release's.
        assert json.loads((data / SCHEMA_FILE).read_text())["version"] == LATEST
        [backup] = data.glob("state.db.v1-*.backup")
        with contextlib.closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as db:
            old = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM kv")}
        assert SCHEMA_KEY not in old and "uid" not in old["/apps/hello"]
    finally:
        p.stop()
        put_away(p)
    # Every record now reads with this code's models.
    for key, value in read_store(data).items():
        prefix = "/" + key.split("/")[1] + "/"
        if prefix in MODELS:
            MODELS[prefix].model_validate_json(json.dumps(value))


def test_every_record_of_the_previous_release_reads_with_this_code_once_migrated(upgraded: Path) -> None:
    data = upgraded
    before = read_store(data)
    assert all("uid" not in v for k, v in before.items() if k.startswith("/instances/"))
    assert list((data / "images" / "locks").glob("*.txt")) and (data / "run" / "a").is_dir()

    async def upgrade() -> tuple[int, int]:
        async with SQLiteStore(data / "state.db") as store:
            paths = Paths(data, run_dir_for(data))
            backup = lambda version: backup_sqlite(store.path, version)  # noqa: E731
            await migrate(store, paths, backup=backup)
            first = await store.revision()
            assert await migrate(store, paths, backup=backup) == LATEST  # once only: nothing left to do
            return first, await store.revision()

    first, again = asyncio.run(upgrade())
    assert first == again
    assert len(list(data.glob("state.db.v*.backup"))) == 1
    after = read_store(data)
    assert after[SCHEMA_KEY]["version"] == LATEST
    for key, value in after.items():
        prefix = "/" + key.split("/")[1] + "/"
        if prefix in MODELS:
            read = MODELS[prefix].model_validate_json(json.dumps(value))
            if prefix == "/releases/":  # served and stored again as it was
                assert read.model_dump(mode="json")["manifest"] == value["manifest"], key
    # The previous release's image manifests read into the contract, and dump to their very bytes:
    # their digests, in its release and instance records, still hold.
    manifests = list((data / "images" / "manifests").glob("*.json"))
    assert len(manifests) >= len(OLD_APPS)
    for path in manifests:
        stored = path.read_bytes()
        assert manifest_json(ImageManifest.model_validate_json(stored)) == stored, path.name
    uids = {k.removeprefix("/appuids/"): v["uid"] for k, v in after.items() if k.startswith("/appuids/")}
    assert set(uids) == OLD_APPS
    assert all(after[f"/uids/{uid}"]["owner"] == app for app, uid in uids.items())
    instances = [v for k, v in after.items() if k.startswith("/instances/")]
    assert instances and all(i["uid"] == uids[i["app"]] for i in instances)
    # Schema 3: what the controllers wrote into the app moved to its status, the spec kept the rest.
    for app in OLD_APPS:
        spec, was = after[f"/apps/{app}"], before[f"/apps/{app}"]
        assert not set(spec) & {"desired", "scale_reason", "woken_at"}
        assert {k: spec[k] for k in was if k in spec and k != "uid"} == {
            k: v for k, v in was.items() if k in spec and k != "uid"
        }
        status = after[f"/appstatus/{app}"]
        assert (status["desired"], status["scale_reason"]) == (
            was.get("desired"),
            was.get("scale_reason", ""),
        ), app
    # Nothing else changed: the releases, deploys, config and tokens are the previous release's own.
    for key, value in before.items():
        if not key.startswith(("/apps/", "/instances/", "/nodes/")):
            assert after[key] == value, key
    # Its lock files were shared by apps, and named by the old uids its socket folders: gone.
    assert not list((data / "images" / "locks").glob("*.txt"))
    assert not (data / "run" / "a").exists()


BULK = 4000  # apps enough that the migration takes a few seconds: time to kill it in the middle


def add_old_apps(data_dir: Path, count: int) -> None:
    """`count` more apps as the previous release stored them (no uid), written with the store."""

    async def add() -> None:
        async with SQLiteStore(data_dir / "state.db") as store:
            kv = await store.get("/apps/flask-demo")
            assert kv is not None
            shape = json.loads(kv.value)
            assert "uid" not in shape
            puts: list[tuple[str, bytes, int | None]] = []
            for n in range(count):
                name = f"bulk-{n:05d}"
                record = {**shape, "name": name, "current_release": None, "current_image": None}
                puts.append(
                    (f"/apps/{name}", json.dumps({**record, "latest_release": 0, "desired": 0}).encode(), 0)
                )
            await store.txn(puts=puts)

    asyncio.run(add())


def consistent(data_dir: Path) -> str:
    """ "before" or "after" the migration, as a killed run left the store; never anything between."""
    records = read_store(data_dir)
    apps = {k.removeprefix("/apps/"): v for k, v in records.items() if k.startswith("/apps/")}
    instances = [v for k, v in records.items() if k.startswith("/instances/")]
    allocated = {
        k.removeprefix("/appuids/"): v["uid"] for k, v in records.items() if k.startswith("/appuids/")
    }
    # A uid is allocated whole (its claim and the app's pointer together), or not at all.
    assert all(records[f"/uids/{uid}"]["owner"] == app for app, uid in allocated.items())
    assert len(set(allocated.values())) == len(allocated)
    if SCHEMA_KEY not in records:
        assert all(a.get("uid") is None for a in apps.values())
        assert all(i.get("uid") is None for i in instances)
        return "before"
    # Each step is one transaction: a kill between two leaves the first done, the next to do.
    version = records[SCHEMA_KEY]["version"]
    assert version in (2, LATEST)
    assert all(a["uid"] == allocated[name] for name, a in apps.items())
    assert all(i["uid"] == allocated[i["app"]] for i in instances)
    statuses = {k.removeprefix("/appstatus/") for k in records if k.startswith("/appstatus/")}
    if version == 2:
        assert not statuses and all("desired" in a for a in apps.values())
        return "between"
    assert statuses == set(apps) and not any("desired" in a for a in apps.values())
    return "after"


def start_raw(p: Platform) -> tuple[subprocess.Popen[bytes], Path]:
    """`osless up` on `p`'s data dir, without waiting for it: the log shows how far it got."""
    log_path = p.data_dir.parent / "up.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                p.osless,
                "up",
                "--data-dir",
                str(p.data_dir),
                "--api-port",
                str(p.api_port),
                "--http-port",
                str(p.http_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OSLESS_CONFIG_DIR": str(p.data_dir / "cli-config"), **p.up_env},
        )
    return proc, log_path


def kill_at(p: Platform, line: str, delay: float) -> None:
    """Start `osless up`, and kill -9 it `delay` seconds after its log shows `line`."""
    proc, log_path = start_raw(p)
    seen = log_path.stat().st_size
    try:
        deadline = time.monotonic() + 60
        while line not in log_path.read_bytes()[seen:].decode(errors="replace"):
            assert proc.poll() is None, p.output()[-2000:]
            assert time.monotonic() < deadline, f"no {line!r} in 60 s: {p.output()[-2000:]}"
            time.sleep(0.002)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def without_volume_tools() -> str:
    """A PATH without the sbin folders: no mkfs.ext4, so volumes stay plain folders."""
    sbin = {"/sbin", "/usr/sbin", "/usr/local/sbin"}
    path = ":".join(d for d in os.environ["PATH"].split(":") if d.rstrip("/") not in sbin)
    assert shutil.which("mkfs.ext4", path=path) is None, "this test needs mkfs.ext4 out of PATH without sbin"
    return path


def test_a_migration_cut_off_by_kill_9_is_finished_or_rolled_back_at_the_next_start(upgraded: Path) -> None:
    data = upgraded
    add_old_apps(data, BULK)
    p = Platform(data, up_env={"PATH": without_volume_tools()})
    # Killed right after the backup, at a random moment once half the uids are allocated, and as the
    # records are written (one transaction): each time all of the migration is there, or none.
    kill_at(p, "upgrading the data dir", 0.0)
    assert consistent(data) == "before"
    kill_at(p, "uids for 2000 of", random.uniform(0.0, 0.2))
    assert consistent(data) == "before"
    allocated = len([k for k in read_store(data) if k.startswith("/appuids/")])
    assert 2000 <= allocated < BULK + len(OLD_APPS), "the kill was to land while uids were allocated"
    kill_at(p, "records in one transaction", 0.0)
    consistent(data)  # either: the transaction is atomic
    kill_at(p, "schema 3: the status of", 0.0)
    assert consistent(data) in ("between", "after")

    p.start(timeout=120)
    try:
        assert consistent(data) == "after"
        assert json.loads((data / SCHEMA_FILE).read_text())["version"] == LATEST
        # One a start (of schema 1, or 2 once a kill fell between the steps), the last few kept.
        assert len(list(data.glob("state.db.v[12]-*.backup"))) == KEEP_BACKUPS
        apps = p.http("GET", "/v1/apps").json()["items"]
        assert len(apps) == BULK + len(OLD_APPS)
        assert len({a["uid"] for a in apps}) == len(apps)
        uids = {a["name"]: a["uid"] for a in apps}
        for app in ("hello", "notes"):
            p.wait_for(lambda app=app: ready(p, app, uids[app]), timeout=60, what=f"{app} to run")
        assert gateway_text(p, "/hello/") == "Hello from osless, v2!\n"
        # A plain-folder volume (no tools here) changed hands with its app: the new uid owns its files.
        folder = data / "volumes" / "notes" / "notes-data"
        assert p.invoke("notes", "get", {"name": "note"}) == (200, "kept")
        assert p.invoke("notes", "put", {"name": "note", "text": "rewritten"}) == (200, "stored")
        assert (folder / "note").stat().st_uid == uids["notes"]
    finally:
        p.stop()


def test_a_data_dir_newer_than_this_osless_is_refused(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data").start()
    p.stop()

    def set_store_version(version: int) -> int:
        async def put() -> int:
            async with SQLiteStore(p.data_dir / "state.db") as store:
                kv = await store.get(SCHEMA_KEY)
                assert kv is not None
                await store.put(SCHEMA_KEY, json.dumps({"version": version}).encode())
                return await store.revision()

        return asyncio.run(put())

    schema_file = p.data_dir / SCHEMA_FILE
    for newer in ("store", "data dir"):
        if newer == "store":
            revision = set_store_version(LATEST + 1)
        else:
            revision = set_store_version(LATEST)
            schema_file.write_text(json.dumps({"version": LATEST + 1}))
        try:
            with pytest.raises(RuntimeError, match="osless up exited with 1") as refused:
                p.start()
        finally:
            p.stop()  # had it started
        # The log's last line (it may follow "osless up exited with 1: " on the same line).
        said = str(refused.value).strip().splitlines()[-1].split("exited with 1: ")[-1]
        assert said.startswith("osless up: this data dir was written by a newer osless"), said
        assert f"schema version {LATEST + 1}" in said and "downgrades are not supported" in said
        # Used for nothing: the store is as it was, and no backup was made.
        assert asyncio.run(_revision(p.data_dir)) == revision
        assert not list(p.data_dir.glob("*.backup"))


async def _revision(data_dir: Path) -> int:
    async with SQLiteStore(data_dir / "state.db") as store:
        return await store.revision()


def test_a_new_data_dir_starts_at_the_latest_schema_without_a_backup(platform: Platform) -> None:
    assert json.loads((platform.data_dir / SCHEMA_FILE).read_text())["version"] == LATEST
    db = platform.data_dir / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (value,) = conn.execute("SELECT value FROM kv WHERE key = ?", (SCHEMA_KEY,)).fetchone()
    assert json.loads(value)["version"] == LATEST
    assert not list(platform.data_dir.glob("*.backup"))
