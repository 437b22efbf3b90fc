"""Configuration as an API: typed, versioned, pushed live into running instances; secrets kept secret."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform import Platform, copy_app, ns_pids

APPS = Path(__file__).parent / "apps"
SECRET = "s3cret-do-not-leak-4711"


@pytest.fixture(scope="module")
def configured(platform: Platform) -> dict[str, Any]:
    return platform.deploy_warm(APPS / "configured")


def read(platform: Platform, app: str = "configured") -> dict[str, Any]:
    status, body = platform.invoke(app, "read")
    assert status == 200, body
    return dict(body)


def patch(platform: Platform, body: dict[str, Any], app: str = "configured") -> httpx.Response:
    return platform.http("PATCH", f"/v1/apps/{app}/config", json=body)


def test_set_and_read_with_types_and_defaults(platform: Platform, configured: dict[str, Any]) -> None:
    schema = platform.cli_json("config", "schema", "configured")
    assert schema["workers"] == {"type": "int", "default": 4, "required": False, "restart": True}
    assert schema["db_password"] == {"type": "secret", "required": True, "restart": False}
    platform.cli("config", "set", "configured", "ratio=0.25", "enabled=true", 'extra={"a": [1, 2]}')
    got = read(platform)
    assert (got["ratio"], got["enabled"], got["extra"]) == (0.25, True, {"a": [1, 2]})
    assert got["greeting"] == "hello"  # a default, never set
    assert platform.cli("config", "get", "configured", "ratio").stdout.strip() == "0.25"


def test_a_running_instance_sees_a_change_without_restart(
    platform: Platform, configured: dict[str, Any]
) -> None:
    before = read(platform)
    version = platform.http("GET", "/v1/apps/configured/config").json()["version"]
    r = patch(platform, {"set": {"greeting": "bonjour"}, "revision": version})
    assert r.status_code == 200 and r.json()["version"] == version + 1
    after = platform.wait_for(
        lambda: (g := read(platform))["greeting"] == "bonjour" and g, what="the new value"
    )
    assert after["pid"] == before["pid"] and after["workers_at_start"] == before["workers_at_start"]
    assert ["greeting"] in platform.invoke("configured", "hook_calls")[1]  # the hook ran, with that key


def test_stale_revision_is_409_and_bad_values_are_422(platform: Platform, configured: dict[str, Any]) -> None:
    version = platform.http("GET", "/v1/apps/configured/config").json()["version"]
    assert patch(platform, {"set": {"greeting": "a"}, "revision": version}).status_code == 200
    stale = patch(platform, {"set": {"greeting": "b"}, "revision": version})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_revision"
    bad = patch(platform, {"set": {"max_items": "many", "enabled": "perhaps"}})
    assert bad.status_code == 422
    message = bad.json()["error"]["message"]
    assert "max_items: expected an integer" in message and "enabled: expected a boolean" in message
    unknown = patch(platform, {"set": {"colour": "red"}})
    assert (
        unknown.status_code == 422
        and "colour: not in the config schema" in unknown.json()["error"]["message"]
    )
    r = platform.cli("config", "set", "configured", "max_items=many", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "error: max_items: expected an integer, got 'many'"


def test_concurrent_writes_without_revision_all_land(platform: Platform, configured: dict[str, Any]) -> None:
    before = platform.http("GET", "/v1/apps/configured/config").json()["version"]
    writers = 40
    start = threading.Barrier(writers)

    def write(i: int) -> httpx.Response:
        start.wait()
        return patch(platform, {"set": {"greeting": f"writer {i}", "max_items": i}})

    with ThreadPoolExecutor(writers) as pool:
        answers = list(pool.map(write, range(writers)))
    refused = [(r.status_code, r.text) for r in answers if r.status_code != 200]
    assert refused == []
    cfg = platform.http("GET", "/v1/apps/configured/config").json()
    assert cfg["version"] == before + writers  # every write counted, none lost
    last = cfg["values"]["max_items"]
    assert (
        last in range(writers) and cfg["values"]["greeting"] == f"writer {last}"
    )  # one writer's whole write
    history = platform.http("GET", "/v1/apps/configured/config/history").json()["items"]
    assert {c["version"] for c in history} >= set(range(before + 1, before + writers + 1))


def rollback(platform: Platform, app: str, body: dict[str, Any]) -> httpx.Response:
    return platform.http("POST", f"/v1/apps/{app}/config/rollback", json=body)


def versions(platform: Platform, app: str, *bodies: dict[str, Any]) -> list[int]:
    """The config version after each PATCH of `bodies`."""
    out = []
    for body in bodies:
        r = patch(platform, body, app=app)
        assert r.status_code == 200, r.text
        out.append(r.json()["version"])
    return out


def without_line(src: Path, dest: Path, line: str) -> Path:
    """A copy of the app at `src` with one line of its app.py left out."""
    copy_app(src, dest)
    code = (dest / "app.py").read_text()
    assert line in code
    (dest / "app.py").write_text(code.replace(line, ""))
    return dest


def test_rollback_never_unsets_a_required_key(platform: Platform) -> None:
    platform.deploy(APPS / "configured", "--name", "rb-required", "--detach")
    v_greeting, v_password = versions(
        platform, "rb-required", {"set": {"greeting": "hi"}}, {"set": {"db_password": SECRET}}
    )
    for to in (0, v_greeting):
        r = rollback(platform, "rb-required", {"to": to, "drop_secrets": True})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "would_unset_required"
        assert f"version {to} has no value for db_password, which the current release" in error["message"]
        assert "osless config history rb-required" in error["message"]
    cfg = platform.http("GET", "/v1/apps/rb-required/config").json()
    assert cfg["version"] == v_password and cfg["values"] == {"db_password": "********", "greeting": "hi"}
    r = platform.cli("config", "rollback", "rb-required", "--to", "0", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: version 0 has no value for db_password")


def test_rollback_drops_a_secret_only_when_told(platform: Platform, tmp_path: Path) -> None:
    platform.deploy(APPS / "configured", "--name", "rb-secret", "--detach")
    v_greeting, _ = versions(
        platform, "rb-secret", {"set": {"greeting": "hi"}}, {"set": {"db_password": SECRET}}
    )
    # The next release no longer declares the secret: it is not required, but it is still set.
    src = without_line(APPS / "configured", tmp_path / "nopw", "    db_password=osless.Secret,\n")
    platform.deploy(src, "--name", "rb-secret", "--detach")
    r = rollback(platform, "rb-secret", {"to": v_greeting})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "would_drop_secrets"
    assert "the secret db_password, set now" in r.json()["error"]["message"]
    assert "--drop-secrets" in r.json()["error"]["message"]
    assert "db_password" in platform.http("GET", "/v1/apps/rb-secret/config").json()["values"]
    refused = platform.cli("config", "rollback", "rb-secret", "--to", str(v_greeting), check=False)
    assert refused.returncode == 1 and "drops secrets only when told to" in refused.stderr
    platform.cli("config", "rollback", "rb-secret", "--to", str(v_greeting), "--drop-secrets")
    cfg = platform.http("GET", "/v1/apps/rb-secret/config").json()
    assert cfg["values"] == {"greeting": "hi"}
    # Version 0 means no values at all: allowed, now that nothing required or secret would go.
    r = rollback(platform, "rb-secret", {"to": 0})
    assert r.status_code == 200, r.text
    assert r.json()["values"] == {} and r.json()["version"] == cfg["version"] + 1
    history = platform.http("GET", "/v1/apps/rb-secret/config/history").json()["items"]
    assert history[0]["description"] == "rollback to version 0"
    assert history[0]["changes"] == {"greeting": {"unset": True}}


def test_rollback_refuses_values_the_schema_no_longer_fits(platform: Platform, tmp_path: Path) -> None:
    platform.deploy(APPS / "configured", "--name", "rb-types", "--detach")
    v_seven, v_unset = versions(platform, "rb-types", {"set": {"max_items": 7}}, {"unset": ["max_items"]})
    src = copy_app(APPS / "configured_v2", tmp_path / "v2")  # max_items is a bool now
    platform.deploy(src, "--name", "rb-types", "--detach")
    r = rollback(platform, "rb-types", {"to": v_seven})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "code": "invalid_value",
        "message": f"version {v_seven} does not fit the current schema: "
        "max_items: expected a boolean (true or false), got 7",
    }
    assert platform.http("GET", "/v1/apps/rb-types/config").json()["version"] == v_unset


def test_history_and_rollback(platform: Platform, configured: dict[str, Any]) -> None:
    patch(platform, {"set": {"max_items": 11}})
    v_eleven = platform.http("GET", "/v1/apps/configured/config").json()["version"]
    patch(platform, {"set": {"max_items": 12}})
    history = platform.cli_json("config", "history", "configured")
    assert history[0]["changes"] == {"max_items": {"set": 12}} and history[0]["by"] == "admin"
    assert history[1]["version"] == v_eleven
    platform.cli("config", "rollback", "configured", "--to", str(v_eleven))
    platform.wait_for(lambda: read(platform)["max_items"] == 11, what="the rolled-back value")
    assert (
        platform.cli_json("config", "history", "configured")[0]["description"]
        == f"rollback to version {v_eleven}"
    )


def test_unset_goes_back_to_the_defaults_live(platform: Platform, configured: dict[str, Any]) -> None:
    platform.cli("config", "set", "configured", "greeting=yo", "max_items=7")
    before = platform.wait_for(lambda: (g := read(platform))["greeting"] == "yo" and g, what="the values")
    version = platform.http("GET", "/v1/apps/configured/config").json()["version"]
    out = platform.cli("config", "unset", "configured", "greeting", "max_items").stdout
    assert out.strip() == f"configured: config version {version + 1}"
    after = platform.wait_for(lambda: (g := read(platform))["greeting"] == "hello" and g, what="the defaults")
    assert after["max_items"] == 10 and after["pid"] == before["pid"]  # live: no restart
    values = platform.http("GET", "/v1/apps/configured/config").json()["values"]
    assert "greeting" not in values and "max_items" not in values
    assert platform.cli("config", "get", "configured", "max_items").stdout.strip() == "10"
    history = platform.cli_json("config", "history", "configured")
    assert history[0]["version"] == version + 1
    assert history[0]["changes"] == {"greeting": {"unset": True}, "max_items": {"unset": True}}
    assert "greeting unset" in platform.cli("config", "history", "configured").stdout
    # Unsetting what is not set changes nothing; a key the app does not declare is a clear error.
    platform.cli("config", "unset", "configured", "greeting")
    assert platform.http("GET", "/v1/apps/configured/config").json()["version"] == version + 1
    r = platform.cli("config", "unset", "configured", "colour", check=False)
    assert r.returncode == 1 and "colour: not in the config schema of 'configured'" in r.stderr


def test_secrets_are_delivered_but_never_shown(platform: Platform, configured: dict[str, Any]) -> None:
    platform.cli("config", "set", "configured", "db_password=-", input=SECRET + "\n")
    import hashlib

    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    platform.wait_for(
        lambda: platform.invoke("configured", "password_digest")[1] == digest, what="the secret"
    )
    shown = [
        platform.http("GET", "/v1/apps/configured/config").text,
        platform.http("GET", "/v1/apps/configured/config/history").text,
        platform.cli("config", "get", "configured").stdout,
        platform.cli("config", "history", "configured").stdout,
        platform.cli("logs", "configured", "--tail", "1000").stdout,
        json.dumps(platform.invoke("configured", "leak_password")[1]),
        platform.http("GET", "/v1/apps/configured").text,
    ]
    for text in shown:
        assert SECRET not in text
    assert "********" in shown[0]
    assert SECRET.encode() not in (platform.data_dir / "state.db").read_bytes()
    for log in (platform.data_dir / "logs").rglob("*"):
        if log.is_file():
            assert SECRET.encode() not in log.read_bytes(), log
    # the admin token cannot read it in clear either: only a node agent's token can
    r = platform.http("GET", "/v1/nodes/anything/apps/configured/config")
    assert r.status_code == 403


def test_an_app_token_opens_only_its_own_app(platform: Platform, configured: dict[str, Any]) -> None:
    platform.deploy(APPS / "victim")
    token = platform.invoke("configured", "token")[1]
    assert token.startswith("osla_configured_")
    own = httpx.get(f"{platform.api}/v1/apps/configured/config", headers={"authorization": f"Bearer {token}"})
    assert own.status_code == 200 and SECRET not in own.text
    for path in ("/v1/apps/victim/config", "/v1/apps", "/v1/nodes/x/apps/configured/config"):
        r = httpx.get(platform.api + path, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 403, path
    r = httpx.post(
        f"{platform.api}/v1/apps/configured/functions/read:invoke",
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403


def test_restart_fields_roll_the_instances_without_failing_requests(
    platform: Platform, configured: dict[str, Any]
) -> None:
    platform.cli("scale", "configured", "--min", "2", "--max", "2")
    platform.wait_for(
        lambda: len([i for i in platform.instances("configured") if i["status"]["phase"] == "ready"]) == 2,
        what="2 instances",
    )
    old_pids = {i["status"]["pid"] for i in platform.instances("configured")}
    failures: list[Any] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            status, body = platform.invoke("configured", "read")
            if status != 200:
                failures.append(body)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        patch(platform, {"set": {"workers": 9}})

        def rolled() -> set[int] | None:
            """The instances' pids once both are ready and neither is one from before the change."""
            instances = platform.instances("configured")
            pids = {i["status"]["pid"] for i in instances}
            done = len(instances) == 2 and all(i["status"]["phase"] == "ready" for i in instances)
            return pids if done and not pids & old_pids else None

        new_pids = platform.wait_for(rolled, timeout=60, what="the roll to replace both instances")
        # Every instance now running was started after the change, and read workers=9 at its start
        # (an instance knows itself by its pid inside its sandbox's pid namespace).
        inner = {ns_pids(pid)[-1] for pid in new_pids}
        seen: dict[int, int] = {}

        def heard_from_each() -> bool:
            got = read(platform)
            seen[got["pid"]] = got["workers_at_start"]
            return set(seen) >= inner

        platform.wait_for(heard_from_each, what="an answer from each instance")
        assert set(seen) == inner and set(seen.values()) == {9}, seen
    finally:
        done.set()
        worker.join()
        platform.cli("scale", "configured", "--min", "1", "--max", "10")
    assert failures == []


def test_a_deploy_whose_schema_no_longer_fits_is_refused(
    platform: Platform, configured: dict[str, Any], tmp_path: Path
) -> None:
    patch(platform, {"set": {"max_items": 7}})
    current = platform.http("GET", "/v1/apps/configured").json()["current_release"]
    src = copy_app(APPS / "configured_v2", tmp_path / "v2")
    r = platform.cli("deploy", str(src), check=False)
    assert r.returncode == 1
    assert "max_items: expected a boolean (true or false), got 7" in r.stderr
    assert "nothing was rolled out" in r.stderr
    assert platform.http("GET", "/v1/apps/configured").json()["current_release"] == current


def test_apps_find_each_other_by_name(platform: Platform, configured: dict[str, Any]) -> None:
    platform.deploy(APPS / "victim")
    status, body = platform.invoke("configured", "call_other", {"app": "victim", "path": "/"})
    assert (status, body) == (200, {"status": 200, "body": "fine"})
    ends = platform.http("GET", "/v1/apps/victim/endpoints").json()
    assert ends["internal_url"] == "http://victim.osless" and ends["url"] == f"{platform.gateway}/victim/"
    assert len(ends["instances"]) >= 1 and ends["instances"][0]["socket"]

    def shown() -> bool:
        info = platform.cli_json("apps", "show", "configured")
        return "victim" in (info.get("calls") or {})

    platform.wait_for(shown, timeout=15, what="the call to show in `osless apps show`")
    assert "called by:   configured" in platform.cli("apps", "show", "victim").stdout


def test_endpoints_can_be_watched(platform: Platform, configured: dict[str, Any]) -> None:
    listed = platform.http("GET", "/v1/apps/configured/endpoints").json()
    known = {i["id"] for i in listed["instances"]}
    events: list[dict[str, Any]] = []
    found = threading.Event()

    def new_and_ready(event: dict[str, Any]) -> bool:
        obj = event.get("object") or {}
        return event.get("type") == "PUT" and obj.get("id") not in known and obj["status"]["phase"] == "ready"

    def watch() -> None:
        with httpx.stream(
            "GET",
            f"{platform.api}/v1/apps/configured/endpoints",
            params={"watch": "true", "revision": listed["revision"]},
            headers={"authorization": f"Bearer {platform.token}"},
            timeout=30,
        ) as r:
            for line in r.iter_lines():
                events.append(json.loads(line))
                if new_and_ready(events[-1]):  # the event this is about: a second instance ready
                    found.set()
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    platform.cli("scale", "configured", "--min", "2", "--max", "10")
    try:
        assert found.wait(30), events
    finally:
        platform.cli("scale", "configured", "--min", "1", "--max", "10")
    t.join(5)
    ready = [e for e in events if new_and_ready(e)]
    assert ready[0]["object"]["app"] == "configured" and ready[0]["object"]["status"]["socket"]
    assert all((e.get("object") or {}).get("app", "configured") == "configured" for e in events)
