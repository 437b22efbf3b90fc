"""`osless up` survives kill -9: every acknowledged change is there and instances come back."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import httpx

from tests.platform import EXAMPLES, Platform, copy_app


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits for a reaper


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
        # a deploy still building at the moment of the kill must never be served
        building = first.http(
            "POST", "/v1/deploys", content=b"\x1f\x8b garbage", headers={"content-type": "application/gzip"}
        ).json()
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
        second.wait_for(
            lambda: len([i for i in second.instances("hello") if i["status"]["phase"] == "ready"]) == 2,
            what="instances to come back",
        )
        r = second.cli("invoke", "hello.greet", '{"name": "Kim"}')
        assert json.loads(r.stdout)["message"] == "Hello, Kim!"
        assert httpx.get(f"{second.gateway}/hello/").status_code == 200
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
        layers = data / "images" / "layers"
        uv_caches = data / "cache" / "uv"
        seen: set[str] = set()
        layer_files = 0
        for dirpath, dirnames, filenames in os.walk(data):
            here = Path(dirpath)
            if here.parent == layers:  # inside a layer: readable by all, for the sandboxes' uids
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
            for name in filenames + (dirnames if here != layers else []):
                mode = os.lstat(here / name).st_mode
                if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                    continue
                assert mode & 0o077 == 0, f"{here / name} is {stat.filemode(mode)}"
                seen.add(name)
        assert {"state.db", "state.db-wal", "state.db-shm", "admin-token", "secret.key"} <= seen
        assert any(n.startswith("d-") and n.endswith(".log") for n in seen)  # a deploy's log
        assert any(n.endswith(".json") for n in seen)  # an image manifest
        assert layer_files > 2
    finally:
        p.stop()
