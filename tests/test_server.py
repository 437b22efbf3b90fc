"""`osless up` survives kill -9: every acknowledged change is there and instances come back."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import stat
import threading
from pathlib import Path

import httpx

from osless.store.sqlite import SQLiteStore
from tests.platform import EXAMPLES, Platform, copy_app, running

APPS = Path(__file__).parent / "apps"
SLOW_IMPORT = APPS / "e2e_slow_import"


def test_kill_9_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    first = Platform(tmp_path / "data").start()
    try:
        src = copy_app(EXAMPLES / "hello", tmp_path / "hello")
        v1 = first.deploy(src)
        (src / "app.py").write_text((src / "app.py").read_text().replace("Hello, {name}!", "Hi, {name}!"))
        v2 = first.deploy(src)
        first.cli("scale", "hello", "--min", "2", "--max", "4")
        rolled = first.cli_json("rollback", "hello")
        first.wait_for(
            lambda: (
                len(
                    [
                        i
                        for i in first.instances("hello")
                        if i["status"]["phase"] == "ready" and i["release"] == rolled["version"]
                    ]
                )
                == 2
            ),
            what="2 instances of v3",
        )
        old_pids = [i["status"]["pid"] for i in first.instances("hello")]
        # A deploy of a good app, still building (importing the app) at the moment of the kill:
        # it must be marked failed, never served, and the release before it must keep serving.
        building = first.upload(SLOW_IMPORT, app="hello")
        first.wait_for_build_line(building["id"], "importing slowly")
        assert first.http("GET", f"/v1/deploys/{building['id']}").json()["status"] == "building"
    finally:
        first.stop(signal.SIGKILL)

    for pid in old_pids:  # instances die with the platform: nothing is left running unsupervised
        first.wait_for(lambda pid=pid: not running(pid), timeout=5, what=f"instance pid {pid} to end")

    second = Platform(tmp_path / "data", api_port=first.api_port, http_port=first.http_port).start()
    try:
        app = second.http("GET", "/v1/apps/hello").json()
        assert (app["min"], app["max"]) == (2, 4)
        assert app["current_release"] == rolled["version"] == 3
        releases = second.cli_json("releases", "hello")
        assert [r["image"] for r in sorted(releases, key=lambda r: r["version"])] == [
            v1["image"],
            v2["image"],
            v1["image"],
        ]
        deploy = second.http("GET", f"/v1/deploys/{building['id']}").json()
        assert deploy["status"] == "failed"
        assert deploy["error"] == "the builder building it stopped: deploy again"
        second.wait_for(
            lambda: len([i for i in second.instances("hello") if i["status"]["phase"] == "ready"]) == 2,
            what="instances to come back",
        )
        assert {i["release"] for i in second.instances("hello")} == {3}
        r = second.cli("invoke", "hello.greet", '{"name": "Kim"}')
        assert json.loads(r.stdout)["message"] == "Hello, Kim!"
        assert httpx.get(f"{second.gateway}/hello/").status_code == 200
        # The interrupted upload was good: deployed again, it builds and serves.
        again = second.deploy(SLOW_IMPORT, "--name", "hello")
        assert again["status"] == "succeeded" and again["release"] == 4
        r = second.cli("invoke", "hello.greet", '{"name": "Kim"}')
        assert json.loads(r.stdout)["message"] == "Howdy, Kim!"
    finally:
        second.stop()


def test_up_saves_credentials_for_the_cli(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data").start()
    try:
        creds = json.loads((tmp_path / "data" / "cli-config" / "credentials.json").read_text())
        assert creds["api"] == p.api and creds["token"] == p.token
        env = {k: v for k, v in p.env.items() if k not in ("OSLESS_API", "OSLESS_TOKEN")}
        import subprocess

        from tests.platform import OSLESS

        r = subprocess.run([OSLESS, "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["gateway"] == p.gateway
    finally:
        p.stop()


def test_the_data_dir_is_for_the_platform_alone(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data").start()
    try:
        p.deploy(EXAMPLES / "hello")
        # the sandboxed app reads its layers, though nothing above them is open to its uid
        assert httpx.get(f"{p.gateway}/hello/").status_code == 200
        data = p.data_dir
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        # the builder's, the node's, and their runtime layers (images.runtime)
        layers = {data / "builder" / "images" / "layers", data / "node" / "images" / "layers"}
        layers |= {data / "builder" / "runtime", data / "runtime"}
        uv_caches = data / "builder" / "cache" / "uv"
        seen: set[str] = set()
        layer_files = 0
        for dirpath, dirnames, filenames in os.walk(data):
            here = Path(dirpath)
            if here.parent in layers:  # inside a layer: readable by all, for the sandboxes' uids
                for inside in [here, *here.rglob("*")]:
                    if not inside.is_symlink():
                        want = 0o005 if inside.is_dir() else 0o004
                        assert inside.stat().st_mode & want == want, inside
                        layer_files += 1
                dirnames.clear()
                continue
            if here.parent == uv_caches:  # an app's uv cache: uv sets its own modes, in a folder of 700
                assert stat.S_IMODE(here.stat().st_mode) == 0o700, here
                dirnames.clear()
                continue
            for name in filenames + (dirnames if here not in layers else []):
                mode = os.lstat(here / name).st_mode
                if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                    continue
                assert mode & 0o077 == 0, f"{here / name} is {stat.filemode(mode)}"
                seen.add(name)
        assert {"state.db", "state.db-wal", "state.db-shm", "admin-token", "secret.key"} <= seen
        assert any(n.endswith(".json") for n in seen)  # an image manifest
        assert layer_files > 2
    finally:
        p.stop()


def test_no_sandbox_says_so_loudly_and_apps_still_run(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data", args=["--no-sandbox"]).start()
    try:
        warning = "APPS RUN WITHOUT A SANDBOX, their builds included: turned off by --no-sandbox"
        assert f"WARNING osless: {warning}" in p.output()
        p.deploy(APPS / "hostile")
        status, me = p.invoke("hostile", "whoami")
        assert status == 200
        # The app runs as the platform does: the host's own uids, hostname, network and processes.
        assert me["uid_map"] == ["0", "0", "4294967295"] and me["hostname"] != "hostile"
        assert me["seccomp"] == "0" and "lo" in me["interfaces"] and len(me["interfaces"]) > 1
        assert p.proc is not None and p.proc.pid in me["pids"]
    finally:
        p.stop()
    sandboxed = Platform(tmp_path / "data").start()  # the same data, sandboxed again once asked
    try:
        assert warning not in sandboxed.output().split("osless is up")[-1]
        sandboxed.wait_for(
            lambda: [running(i["status"]["pid"]) for i in sandboxed.instances("hostile")] == [True],
            what="the instance to be back",
        )
        status, me = sandboxed.invoke("hostile", "whoami")
        assert status == 200 and me["hostname"] == "hostile" and me["interfaces"] == ["lo"]
    finally:
        sandboxed.stop()


def test_kill_9_during_a_burst_of_config_writes_keeps_every_acknowledged_one(tmp_path: Path) -> None:
    first = Platform(tmp_path / "data").start()
    acked: list[tuple[int, int]] = []  # (version, max_items) of each write answered 200
    stop = threading.Event()

    def writer(n: int) -> None:
        with httpx.Client(headers={"authorization": f"Bearer {first.token}"}, timeout=10) as client:
            for k in itertools.count():
                if stop.is_set():
                    return
                value = n * 100_000 + k
                try:
                    r = client.patch(
                        f"{first.api}/v1/apps/configured/config", json={"set": {"max_items": value}}
                    )
                except httpx.HTTPError:
                    return  # the platform is gone: not acknowledged, nothing promised
                if r.status_code == 200:
                    acked.append((r.json()["version"], value))

    try:
        first.deploy(APPS / "configured")
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for w in writers:
            w.start()
        first.wait_for(lambda: len(acked) >= 10, what="writes to be acknowledged")
    finally:
        first.stop(signal.SIGKILL)
        stop.set()
        for w in writers:
            w.join()

    second = Platform(tmp_path / "data", api_port=first.api_port, http_port=first.http_port).start()
    try:
        config = second.http("GET", "/v1/apps/configured/config").json()
        history = second.http("GET", "/v1/apps/configured/config/history").json()["items"]
        # Every acknowledged write is there, as the version it was acknowledged as.
        by_version = {h["version"]: h["changes"]["max_items"]["set"] for h in history}
        for version, value in acked:
            assert by_version.get(version) == value, (version, value)
        # The config and its history went together: no version lost, none half-written.
        assert sorted(by_version) == list(range(1, config["version"] + 1))
        assert config["values"]["max_items"] == by_version[config["version"]]
        assert config["version"] >= max(v for v, _ in acked)
        second.wait_for(
            lambda: [running(i["status"]["pid"]) for i in second.instances("configured")] == [True],
            what="the instance to be back",
        )
        assert second.invoke("configured", "read")[1]["max_items"] == config["values"]["max_items"]
    finally:
        second.stop()


def test_a_clean_stop_revokes_the_server_s_controller_token(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data").start()
    try:
        listed = p.http("GET", "/v1/tokens").json()["items"]
        mine = [t["name"] for t in listed if t["role"] == "controller"]
        assert len(mine) == 1 and mine[0].startswith("controller-"), listed
        # Its controllers lead: it is all up (a SIGTERM before that ends it unhandled).
        p.wait_for(lambda: p.http("GET", "/v1/leaders/controllers").status_code == 200, what="a leader")
    finally:
        p.stop()

    async def controllers_left() -> list[str]:
        store = SQLiteStore(tmp_path / "data" / "state.db")
        await store.start()
        try:
            kvs, _ = await store.list("/tokens/")
        finally:
            await store.close()
        return [json.loads(kv.value)["name"] for kv in kvs if json.loads(kv.value)["role"] == "controller"]

    # A server retired for good leaves no token behind that acts as its controllers.
    assert asyncio.run(controllers_left()) == []
