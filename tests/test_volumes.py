"""Volumes of a declared size on a real platform: ENOSPC at the size, data kept across restarts and
kill -9, apps kept apart, deleted with their app, and plain folders where the host lacks the tools."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.node.agent import run_dir_for
from tests.platform import AuthRecorder, Platform, copy_app

APPS = Path(__file__).parent / "apps"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("volumes") / "data").start()
    try:
        yield p
    finally:
        p.stop()
        put_away(p)


@pytest.fixture(scope="module")
def apps(platform: Platform) -> None:
    platform.deploy_warm(APPS / "volume_quota")
    platform.deploy_warm(APPS / "volume_plain")


def call(platform: Platform, app: str, fn: str, event: Any = None) -> Any:
    status, body = platform.invoke(app, fn, event)
    assert status == 200, body
    return body


def image(platform: Platform, app: str, name: str) -> Path:
    return platform.data_dir / "volumes" / app / f"{name}.img"


def mount_point(platform: Platform, app: str, name: str) -> Path:
    return Path(os.path.realpath(run_dir_for(platform.data_dir))) / "volumes" / app / name


def mounts_under(folder: Path) -> list[str]:
    """Mount points below `folder` in this (the host's) mount namespace."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(f"{folder}/")]


def loop_files() -> set[str]:
    """The files behind the host's attached loop devices."""
    found = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):  # detached meanwhile
            found.add(backing.read_text().strip())
    return found


def start(platform: Platform, *apps: str) -> None:
    """Start the platform again and wait for each app's instance of this run: until it reports, the
    record still says ready from before, and a call sent there waits for its timeout."""
    since = time.time()
    platform.start()
    for app in apps:
        platform.wait_for(
            lambda app=app: any(
                i["status"]["phase"] == "ready" and i["status"]["updated_at"] > since
                for i in platform.instances(app)
            ),
            what=f"{app} to be ready again",
        )


def put_away(platform: Platform) -> None:
    """What a test that failed between a kill -9 and the next start would leave on the host."""
    for point in mounts_under(Path(os.path.realpath(run_dir_for(platform.data_dir)))):
        subprocess.run(["umount", "--lazy", point], check=False)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().startswith(f"{os.path.realpath(platform.data_dir)}/"):
                subprocess.run(["losetup", "--detach", f"/dev/{backing.parent.parent.name}"], check=False)


def restart(platform: Platform, *apps: str) -> None:
    platform.stop()
    start(platform, *apps)


def test_writing_past_the_size_fails_with_enospc(platform: Platform, apps: None) -> None:
    assert call(platform, "quota", "put", {"name": "note", "text": "before"}) == "stored"
    filled = call(platform, "quota", "fill", {"max_mb": 64})
    assert filled["errno"] == errno.ENOSPC, filled
    assert 10 <= filled["written_mb"] < 16, filled
    # The host paid for the image and nothing else: the writes landed in it, not beside it.
    img = image(platform, "quota", "quota-data")
    assert img.stat().st_size == 16 * MB
    assert img.stat().st_blocks * 512 <= 17 * MB
    assert sorted(p.name for p in img.parent.iterdir()) == [".owner", "quota-data.img"]
    assert os.path.ismount(mount_point(platform, "quota", "quota-data"))
    # After the error the app serves on, its data intact, and writes again once it makes room.
    assert call(platform, "quota", "get", {"name": "note"}) == "before"
    web = httpx.get(f"{platform.gateway}/quota/", timeout=30)
    assert (web.status_code, web.text) == (200, "fine")
    assert call(platform, "quota", "drop") == "dropped"
    assert call(platform, "quota", "fill", {"max_mb": 4}) == {"written_mb": 4, "errno": None}


def test_apps_volumes_are_apart_and_a_plain_name_gets_the_default_size(
    platform: Platform, apps: None
) -> None:
    call(platform, "quota", "put", {"name": "mine", "text": "quota's"})
    call(platform, "notes", "put", {"name": "mine", "text": "notes'"})
    assert call(platform, "quota", "get", {"name": "mine"}) == "quota's"
    assert call(platform, "notes", "get", {"name": "mine"}) == "notes'"
    notes = call(platform, "notes", "space")
    assert notes["files"] == ["lost+found", "mine"]
    assert 900 < notes["total_mb"] <= 1024  # 1024 MB less the filesystem's own
    assert 12 < call(platform, "quota", "space")["total_mb"] <= 16
    img = image(platform, "notes", "notes-data")
    assert img.stat().st_size == 1024 * MB and img.stat().st_blocks * 512 < 64 * MB  # sparse


def volumes(platform: Platform, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**platform.env, **({"OSLESS_TOKEN": token} if token else {})}
    return subprocess.run(
        [platform.osless, "volumes", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def volumes_json(platform: Platform, *args: str) -> Any:
    r = volumes(platform, *args, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_files_put_into_a_volume_are_the_app_s_and_what_it_writes_comes_back(
    platform: Platform, apps: None, tmp_path: Path
) -> None:
    local = tmp_path / "seed.txt"
    local.write_text("seeded from the CLI")
    put = volumes_json(platform, "put", "notes", "notes-data", str(local), "seeds/")
    assert [(u["path"], u["size"]) for u in put["uploaded"]] == [("seeds/seed.txt", 19)]
    assert call(platform, "notes", "get", {"name": "seeds/seed.txt"}) == "seeded from the CLI"
    # Written as the app: its uid owns the file and the folder made for it.
    point = mount_point(platform, "notes", "notes-data")
    uid = platform.instances("notes")[0]["uid"]
    assert (point / "seeds").stat().st_uid == uid and (point / "seeds" / "seed.txt").stat().st_uid == uid

    assert call(platform, "notes", "put", {"name": "from-app.txt", "text": "written by the app"}) == "stored"
    got = volumes(platform, "get", "notes", "notes-data", "from-app.txt", "-")
    assert (got.returncode, got.stdout) == (0, "written by the app"), got.stderr
    assert volumes_json(platform, "get", "notes", "notes-data", "from-app.txt", str(tmp_path))["size"] == 18
    assert (tmp_path / "from-app.txt").read_text() == "written by the app"

    listed = volumes_json(platform, "ls", "notes")
    [notes] = [v for v in listed["items"] if v["name"] == "notes-data"]
    assert notes["path"] == "/data" and notes["size_mb"] == 1024
    [held] = notes["nodes"]
    assert held["mounted"] and 900 * MB < held["size_bytes"] <= 1024 * MB and held["used_bytes"] > 0
    names = {e["name"]: e for e in volumes_json(platform, "ls", "notes", "notes-data")["items"]}
    assert names["seeds"]["type"] == "folder" and names["from-app.txt"]["type"] == "file"
    assert names["from-app.txt"]["size"] == 18
    inner = volumes_json(platform, "ls", "notes", "notes-data/seeds")["items"]
    assert [(e["name"], e["size"]) for e in inner] == [("seed.txt", 19)]

    # No file is replaced unless asked.
    again = volumes(platform, "put", "notes", "notes-data", str(local), "seeds/seed.txt")
    assert again.returncode == 1 and "exists" in again.stderr and "--force" in again.stderr
    local.write_text("replaced")
    volumes_json(platform, "put", "notes", "notes-data", str(local), "seeds/seed.txt", "--force")
    assert call(platform, "notes", "get", {"name": "seeds/seed.txt"}) == "replaced"

    folder = volumes(platform, "rm", "notes", "notes-data", "seeds")
    assert folder.returncode == 1 and "-r" in folder.stderr
    volumes_json(platform, "rm", "notes", "notes-data", "seeds", "-r")
    volumes_json(platform, "rm", "notes", "notes-data", "from-app.txt")
    assert call(platform, "notes", "get", {"name": "from-app.txt"}) is None
    assert call(platform, "notes", "get", {"name": "seeds/seed.txt"}) is None
    gone = volumes(platform, "get", "notes", "notes-data", "from-app.txt", "-", "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["error"]["code"] == "not_found"
    # Writes are audited, reads are not.
    audited = platform.http("GET", "/v1/audit", params={"app": "notes"}).json()["items"]
    writes = {
        (a["method"], a["path"].split("?")[0], a["status"]) for a in audited if "/volumes/" in a["path"]
    }
    assert {
        ("PUT", "/v1/apps/notes/volumes/notes-data/files/seeds/seed.txt", 201),
        ("PUT", "/v1/apps/notes/volumes/notes-data/files/seeds/seed.txt", 409),
        ("DELETE", "/v1/apps/notes/volumes/notes-data/files/seeds", 204),
    } <= writes
    assert not [w for w in writes if w[0] == "GET"]


def test_links_fifos_and_paths_the_app_planted_never_lead_out_of_the_volume(
    platform: Platform, apps: None, tmp_path: Path
) -> None:
    secret = platform.data_dir / "admin-token"
    before = (secret.read_bytes(), Path("/etc/hostname").read_bytes())
    call(platform, "notes", "link", {"name": "token", "target": str(secret)})
    call(platform, "notes", "link", {"name": "hostname", "target": "/etc/hostname"})
    call(platform, "notes", "link", {"name": "datadir", "target": str(platform.data_dir)})
    call(platform, "notes", "link", {"name": "etc", "target": "/etc"})
    call(platform, "notes", "fifo", {"name": "pipe"})
    try:
        for name in ("token", "hostname", "datadir/admin-token", "etc/hostname"):
            r = platform.http("GET", f"/v1/apps/notes/volumes/notes-data/files/{name}")
            assert (r.status_code, r.json()["error"]["code"]) == (400, "link_refused"), (name, r.text)
            listed = platform.http("GET", "/v1/apps/notes/volumes/notes-data/entries", params={"path": name})
            assert listed.status_code == 400, (name, listed.text)
        # A fifo is refused at once, not waited on.
        r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/files/pipe", timeout=10)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "not_a_file"), r.text
        kinds = {e["name"]: e["type"] for e in volumes_json(platform, "ls", "notes", "notes-data")["items"]}
        assert kinds["token"] == kinds["etc"] == "link" and kinds["pipe"] == "other"
        # Writes through a link's folder are refused; over a link, they replace the link itself.
        local = tmp_path / "x"
        local.write_bytes(b"planted")
        through = volumes(
            platform, "put", "notes", "notes-data", str(local), "datadir/admin-token", "--force"
        )
        assert through.returncode == 1 and "link" in through.stderr, through.stderr
        volumes_json(platform, "put", "notes", "notes-data", str(local), "hostname", "--force")
        assert (secret.read_bytes(), Path("/etc/hostname").read_bytes()) == before
        assert not os.path.islink(mount_point(platform, "notes", "notes-data") / "hostname")
        assert call(platform, "notes", "get", {"name": "hostname"}) == "planted"
        # Paths that climb out, absolute or with NUL are refused before any node is asked.
        for path in ("%2e%2e/%2e%2e/etc/hostname", "seeds/%2e%2e/%2e%2e/x", "a%00b"):
            r = platform.http("GET", f"/v1/apps/notes/volumes/notes-data/files/{path}")
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_path"), (path, r.text)
        r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/entries", params={"path": "../.."})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_path"), r.text
        r = platform.http("PUT", "/v1/apps/notes/volumes/notes-data/files/%2e%2e/escaped", content=b"x")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_path"), r.text
        assert not (
            Path(os.path.realpath(run_dir_for(platform.data_dir))) / "volumes" / "notes" / "escaped"
        ).exists()
    finally:
        for name in ("token", "hostname", "datadir", "etc", "pipe"):
            volumes(platform, "rm", "notes", "notes-data", name)


def test_a_read_token_reads_no_volume(platform: Platform, apps: None) -> None:
    call(platform, "notes", "put", {"name": "kept", "text": "the app's"})
    token = platform.cli_json("tokens", "create", "--role", "read", "--name", "volumes-reader")["token"]
    for method, path in (
        ("GET", "/v1/apps/notes/volumes"),
        ("GET", "/v1/apps/notes/volumes/notes-data/entries"),
        ("GET", "/v1/apps/notes/volumes/notes-data/files/kept"),
        ("PUT", "/v1/apps/notes/volumes/notes-data/files/new"),
        ("DELETE", "/v1/apps/notes/volumes/notes-data/files/kept"),
    ):
        r = platform.http(method, path, headers={"authorization": f"Bearer {token}"}, content=b"x")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), (method, path, r.text)
    r = volumes(platform, "get", "notes", "notes-data", "kept", "-", token=token)
    assert r.returncode == 1 and "'deploy' permission" in r.stderr
    assert call(platform, "notes", "get", {"name": "kept"}) == "the app's"
    assert call(platform, "notes", "get", {"name": "new"}) is None
    volumes(platform, "rm", "notes", "notes-data", "kept")


def test_only_a_volume_upload_may_send_a_body_past_the_api_s_limit(platform: Platform, apps: None) -> None:
    # An app named "volumes" put "/volumes/" in the path of routes that read their whole JSON body
    # into memory, before any permission is checked: any token could make the API hold 4 GiB.
    read = platform.cli_json("tokens", "create", "--role", "read", "--name", "large-body")["token"]
    body = b"{" + b" " * (7 * MB) + b"}"  # past the 6 MiB of a request's body
    for path in ("/v1/apps/volumes/scale", "/v1/apps/volumes/desired"):
        r = platform.http(
            "PUT",
            path,
            content=body,
            headers={"authorization": f"Bearer {read}", "content-type": "application/json"},
        )
        assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large"), (path, r.text)
    r = platform.http("PUT", "/v1/apps/notes/volumes/notes-data/files/large", content=body)
    assert r.status_code == 201, r.text  # an upload may
    volumes_json(platform, "rm", "notes", "notes-data", "large")


def test_a_listing_of_the_longest_names_is_answered_whole(platform: Platform, apps: None) -> None:
    # Names of 255 control characters: each is sent as a 6-byte escape in the node's JSON.
    fat = mount_point(platform, "notes", "notes-data") / "fat"
    fat.mkdir()
    for i in range(1001):
        (fat / os.fsdecode(bytes([1 + i % 30]) * 251 + b"%04d" % i)).touch()  # as the app could
    try:
        r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/entries", params={"path": "fat"})
        assert r.status_code == 200, r.text[:300]
        got = r.json()
        assert (len(got["items"]), got["truncated"]) == (1000, True)
        assert all(len(os.fsencode(e["name"])) == 255 for e in got["items"])
    finally:
        volumes_json(platform, "rm", "notes", "notes-data", "fat", "-r")


def test_names_the_app_chose_are_shown_as_text_never_as_markup_or_terminal_codes(
    platform: Platform, apps: None
) -> None:
    planted = mount_point(platform, "notes", "notes-data") / "shown"
    planted.mkdir()
    for name in ("[red]r", "[bold]b", "\x1b]0;pwned\x07t", "\x1b[2Jclear"):
        (planted / name).touch()  # as the app could
    try:
        r = volumes(platform, "ls", "notes", "notes-data/shown")
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout, repr(r.stdout)
        for shown in ("[red]r", "[bold]b", "\\x1b]0;pwned\\x07t", "\\x1b[2Jclear"):
            assert shown in r.stdout, (shown, r.stdout)
    finally:
        volumes_json(platform, "rm", "notes", "notes-data", "shown", "-r")


def test_a_node_the_app_never_ran_on_is_never_asked_for_its_volumes(platform: Platform, apps: None) -> None:
    # A hostile node, with its own node token only, claims every volume it is asked about: believed,
    # it would be sent the uploads of apps never placed on it, and answer for their files.
    claim = [
        {"name": n, "size_bytes": MB, "used_bytes": 0, "mounted": True} for n in ("notes-data", "ghost-data")
    ]
    hostile = AuthRecorder(json.dumps({"items": claim}).encode(), "application/json")
    evil = platform.cli_json("tokens", "create", "--role", "node", "--name", "node:evil")["token"]
    assert platform.http("POST", "/v1/apps", json={"name": "ghost"}).status_code == 201  # placed nowhere
    try:
        beat = {"ttl_s": 2, "api": hostile.url}
        r = platform.http("PUT", "/v1/nodes/evil", json=beat, headers={"authorization": f"Bearer {evil}"})
        assert r.status_code == 200, r.text
        r = platform.http("PUT", "/v1/apps/ghost/volumes/ghost-data/files/seed", content=b"the owner's")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "volume_not_found"), r.text
        r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/entries", params={"node": "evil"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "node_not_found"), r.text
        call(platform, "notes", "put", {"name": "real", "text": "the app's"})
        r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/files/real")
        assert (r.status_code, r.text) == (200, "the app's")  # its one holder: no 409 several_nodes
        assert hostile.shown == []
    finally:
        hostile.close()
        platform.http("DELETE", "/v1/apps/ghost")
        platform.wait_for(
            lambda: "evil" not in [n["name"] for n in platform.http("GET", "/v1/nodes").json()["items"]],
            what="the hostile node's lease to end",
        )
    volumes(platform, "rm", "notes", "notes-data", "real")


def test_the_node_opens_volumes_only_to_the_api_s_token_made_for_it(platform: Platform, apps: None) -> None:
    from osless.api.secrets import SecretBox, load_key

    [node] = platform.http("GET", "/v1/nodes").json()["items"]
    box = SecretBox(load_key(platform.data_dir))
    url = f"{node['api']}/volumes/apps/notes/notes-data/entries"

    uid = platform.http("GET", "/v1/apps/notes").json()["uid"]

    def ask(token: str, app: str = "notes") -> int:
        return httpx.get(
            url.replace("/notes/", f"/{app}/"),
            params={"uid": uid},
            headers={"authorization": f"Bearer {token}"},
        ).status_code

    assert ask(box.scoped_token("volumes", "notes", 60, node["name"])) == 200
    assert ask(platform.token) == 403  # an admin's own token: the node takes only what the API made
    assert ask(box.scoped_token("volumes", "notes", 60, "another-node")) == 403
    assert ask(box.scoped_token("volumes", "notes", 60, node["name"]), app="quota") == 403
    assert ask(box.scoped_token("reader", "notes", 60, node["name"])) == 403


def test_volumes_survive_a_restart_and_are_unmounted_when_the_platform_stops(
    platform: Platform, apps: None
) -> None:
    call(platform, "quota", "put", {"name": "note", "text": "kept"})
    points = mount_point(platform, "quota", "x").parent.parent
    platform.stop()
    assert mounts_under(points) == []
    assert not {str(image(platform, a, f"{a}-data")) for a in ("quota", "notes")} & loop_files()
    start(platform, "quota", "notes")
    assert call(platform, "quota", "get", {"name": "note"}) == "kept"
    assert call(platform, "notes", "get", {"name": "mine"}) == "notes'"


def test_after_kill_9_the_volumes_mount_again_with_their_data(platform: Platform, apps: None) -> None:
    call(platform, "quota", "put", {"name": "note", "text": "before the crash"})
    point = mount_point(platform, "quota", "quota-data")
    platform.stop(signal.SIGKILL)
    assert os.path.ismount(point)  # a killed platform leaves its mounts behind
    start(platform, "quota", "notes")
    assert call(platform, "quota", "get", {"name": "note"}) == "before the crash"
    assert mounts_under(point.parent) == [str(point)]  # reused, not mounted twice
    backed = [f for f in loop_files() if f == str(image(platform, "quota", "quota-data"))]
    assert len(backed) == 1, backed  # one loop device: two would be two filesystems on one image
    restart(platform, "quota")  # and a clean stop after a crash still puts everything away
    assert platform.invoke("quota", "get", {"name": "note"}) == (200, "before the crash")


def test_a_volume_grows_with_its_declared_size_and_never_shrinks(
    platform: Platform, apps: None, tmp_path: Path
) -> None:
    bigger = copy_app(APPS / "volume_quota", tmp_path / "bigger")
    source = (bigger / "app.py").read_text()
    (bigger / "app.py").write_text(source.replace("size_mb=16", "size_mb=32"))
    platform.deploy(bigger)
    # Online resizing needs CAP_SYS_RESOURCE; without it the image grows at its next mount.
    restart(platform, "quota")
    assert 28 < call(platform, "quota", "space")["total_mb"] <= 32
    filled = call(platform, "quota", "fill", {"max_mb": 64})
    assert filled["errno"] == errno.ENOSPC and 20 < filled["written_mb"] < 32, filled
    assert call(platform, "quota", "get", {"name": "note"}) == "before the crash"
    call(platform, "quota", "drop")

    platform.deploy(APPS / "volume_quota")  # 16 MB again: refused quietly, never shrunk
    restart(platform, "quota")
    assert 28 < call(platform, "quota", "space")["total_mb"] <= 32
    logs = platform.cli("logs", "quota").stdout
    assert "never shrinks" in logs and "stays at 32 MB" in logs


def test_a_new_app_of_a_deleted_app_s_name_never_reaches_its_volumes(platform: Platform, apps: None) -> None:
    call(platform, "notes", "put", {"name": "old-secret", "text": "the deleted app's"})
    assert platform.http("DELETE", "/v1/apps/notes").status_code == 204
    # Made again at once: the node has not yet put away what the deleted app left on its disk.
    assert platform.http("POST", "/v1/apps", json={"name": "notes"}).status_code == 201
    r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/files/old-secret")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "volume_not_found"), r.text
    # An upload there would be acknowledged, then deleted with the old volume when the app starts.
    r = platform.http("PUT", "/v1/apps/notes/volumes/notes-data/files/new", content=b"would be lost")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "volume_not_found"), r.text
    [node] = platform.http("GET", "/v1/nodes").json()["items"]
    r = platform.http("GET", "/v1/apps/notes/volumes/notes-data/entries", params={"node": node["name"]})
    assert r.status_code == 404, r.text
    assert platform.http("GET", "/v1/apps/notes/volumes").json()["items"] == []
    platform.deploy_warm(APPS / "volume_plain")
    assert call(platform, "notes", "get", {"name": "old-secret"}) is None


def test_deleting_an_app_deletes_its_volumes(platform: Platform, apps: None) -> None:
    folder = platform.data_dir / "volumes" / "notes"
    assert folder.is_dir()
    assert platform.http("DELETE", "/v1/apps/notes").status_code == 204
    platform.wait_for(lambda: not folder.exists(), what="the deleted app's volumes to go")
    assert mounts_under(mount_point(platform, "notes", "x").parent) == []
    assert (platform.data_dir / "volumes" / "quota" / "quota-data.img").exists()  # the others stay
    # A new app of the same name (a new uid) starts empty.
    platform.deploy_warm(APPS / "volume_plain")
    assert call(platform, "notes", "get", {"name": "mine"}) is None


def test_without_the_tools_volumes_are_plain_folders_then_move_into_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbin = {"/sbin", "/usr/sbin", "/usr/local/sbin"}
    plain_path = ":".join(d for d in os.environ["PATH"].split(":") if d.rstrip("/") not in sbin)
    monkeypatch.setenv("PATH", plain_path)
    assert shutil.which("mkfs.ext4") is None, "this test needs mkfs.ext4 out of PATH without the sbin folders"
    p = Platform(tmp_path / "data").start()
    try:
        checks = {c["name"]: c for c in json.loads(p.cli("doctor", "--json", check=False).stdout)}
        assert not checks["volume quotas"]["ok"] and "mkfs.ext4" in checks["volume quotas"]["detail"]
        assert "PROTECTION MISSING on this host: volume quotas" in p.output()
        p.deploy_warm(APPS / "volume_plain")
        assert call(p, "notes", "put", {"name": "note", "text": "in a folder"}) == "stored"
        folder = p.data_dir / "volumes" / "notes" / "notes-data"
        assert (folder / "note").read_text() == "in a folder"
        # A link to a host file the app cannot see: a copy that followed it would hand it the file.
        token = p.data_dir / "admin-token"
        assert call(p, "notes", "link", {"name": "token", "target": str(token)}) == "linked"
        p.stop()

        monkeypatch.undo()  # the tools are back: the folder's data moves into an image
        start(p, "notes")
        assert call(p, "notes", "get", {"name": "note"}) == "in a folder"
        assert not folder.exists() and image(p, "notes", "notes-data").is_file()
        assert os.path.ismount(mount_point(p, "notes", "notes-data"))
        assert call(p, "notes", "get", {"name": "token"}) is None  # still a link to nothing it sees
        assert os.readlink(mount_point(p, "notes", "notes-data") / "token") == str(token)
        assert token.stat().st_uid == 0 and token.stat().st_mode & 0o077 == 0
        assert call(p, "notes", "put", {"name": "note", "text": "in an image"}) == "stored"
    finally:
        p.stop()
        put_away(p)
