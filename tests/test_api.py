"""The REST API's contract: tokens, one error shape, 4xx for bad input, OpenAPI, watch streams."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.platform import Platform, running

APPS = Path(__file__).parent / "apps"


def test_every_v1_path_needs_a_token(platform: Platform) -> None:
    for path in ("/v1/apps", "/v1/status", "/v1/instances", "/v1/deploys"):
        r = httpx.get(platform.api + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(platform.api + "/v1/apps", headers={"authorization": "Bearer osl_wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid token"


def test_openapi_lists_the_resources(platform: Platform) -> None:
    spec = platform.http("GET", "/openapi.json").json()
    for path in (
        "/v1/apps",
        "/v1/deploys",
        "/v1/apps/{app}/functions/{function}:invoke",
        "/v1/apps/{app}/rollback",
        "/v1/apps/{app}/scale",
        "/v1/apps/{app}/logs",
        "/v1/instances",
    ):
        assert path in spec["paths"], path


def test_malformed_json_is_400(platform: Platform) -> None:
    r = platform.http("POST", "/v1/apps", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed_json"


def test_invalid_fields_are_422_naming_the_field(platform: Platform) -> None:
    r = platform.http("POST", "/v1/apps", json={"name": "Not_Valid"})
    assert r.status_code == 422 and "Not_Valid" in r.json()["error"]["message"]
    r = platform.http("POST", "/v1/apps", json={"nam": "x"})
    assert r.status_code == 422 and "name" in r.json()["error"]["message"]


def test_scale_validation(platform: Platform, hello: dict[str, Any]) -> None:
    r = platform.http("PUT", "/v1/apps/hello/scale", json={"min": 3, "max": 1})
    assert r.status_code == 422 and "must not exceed" in r.json()["error"]["message"]
    r = platform.http("PUT", "/v1/apps/hello/scale", json={"min": -1, "max": 1})
    assert r.status_code == 422
    r = platform.cli("scale", "hello", "--min", "2", "--max", "1", check=False)
    assert r.returncode == 1 and "must not exceed" in r.stderr


def test_oversized_bodies_are_413(platform: Platform) -> None:
    big = b"x" * (7 * 1024 * 1024)
    r = platform.http("POST", "/v1/apps", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks() -> Any:  # no content-length: the limit holds while streaming too
        for _ in range(8):
            yield b"x" * (1024 * 1024)

    r = platform.http("POST", "/v1/apps", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_write_past_the_store_value_limit_is_413(platform: Platform) -> None:
    # Under the 6 MiB body limit, but the record it would make passes the store's 1 MiB per value.
    calls = [{"caller": "a" * 40, "callee": "b" * 40, "count": i} for i in range(20_000)]
    r = platform.http("PUT", "/v1/nodes/big/calls", json={"calls": calls})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "value_too_large"
    assert "/calls/big" in error["message"] and "past the limit of 1024 KiB per record" in error["message"]
    assert platform.http("PUT", "/v1/nodes/big/calls", json={"calls": []}).status_code == 200


def test_upload_of_wrong_type_or_garbage_is_4xx(platform: Platform) -> None:
    r = platform.http("POST", "/v1/deploys", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = platform.http(
        "POST", "/v1/deploys", content=b"not a tarball", headers={"content-type": "application/gzip"}
    )
    assert r.status_code == 202  # accepted, then the build says what is wrong
    deploy_id = r.json()["id"]
    lines = [
        json.loads(x)
        for x in platform.http(
            "GET", f"/v1/deploys/{deploy_id}/log", params={"follow": "true"}
        ).text.splitlines()
    ]
    assert lines[-1]["deploy"]["status"] == "failed"
    assert "archive" in lines[-1]["deploy"]["error"].lower()


def test_unknown_resources_are_404_json(platform: Platform) -> None:
    for path in ("/v1/apps/ghost", "/v1/apps/ghost/releases", "/v1/deploys/d-000", "/v1/nope"):
        r = platform.http("GET", path)
        assert r.status_code == 404, path
        assert set(r.json()["error"]) == {"code", "message"}


def test_watch_streams_app_changes(platform: Platform) -> None:
    listed = platform.http("GET", "/v1/apps").json()
    events: list[dict[str, Any]] = []

    def watch() -> None:
        with httpx.stream(
            "GET",
            platform.api + "/v1/apps",
            params={"watch": "true", "revision": listed["revision"]},
            headers={"authorization": f"Bearer {platform.token}"},
            timeout=20,
        ) as r:
            for line in r.iter_lines():
                events.append(json.loads(line))
                if events[-1].get("name") == "watched":
                    return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert platform.http("POST", "/v1/apps", json={"name": "watched"}).status_code == 201
    t.join(15)
    assert events and events[-1]["type"] == "PUT" and events[-1]["object"]["name"] == "watched"


def test_the_autoscaler_s_writes_never_conflict_with_osless_scale(platform: Platform) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "both"}).status_code == 201
    made = platform.http("POST", "/v1/tokens", json={"role": "controller", "name": "spec-status"})
    controller = {"authorization": f"Bearer {made.json()['token']}"}
    rounds = 25
    answers: list[tuple[str, int, str]] = []

    def people(k: int) -> None:  # `osless scale`, as it calls the API
        for n in range(rounds):
            r = platform.http("PUT", "/v1/apps/both/scale", json={"max": 10 + 2 * n + k})
            answers.append(("scale", r.status_code, r.text))

    def autoscaler(k: int) -> None:
        for n in range(rounds):
            body = {"desired": 2 * n + k, "reason": f"decision {k}.{n}"}
            r = httpx.put(f"{platform.api}/v1/apps/both/desired", json=body, headers=controller, timeout=30)
            answers.append(("desired", r.status_code, r.text))

    threads = [threading.Thread(target=f, args=(k,)) for f in (people, autoscaler) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a for a in answers if a[1] != 200] == [] and len(answers) == 4 * rounds
    # The spec changed with people's writes only: the status, stored apart, took the controller's.
    db = sqlite3.connect(f"file:{platform.data_dir / 'state.db'}?mode=ro", uri=True)
    writes = dict(
        db.execute(
            "SELECT key, count(*) FROM events WHERE key IN ('/apps/both', '/appstatus/both') GROUP BY key"
        ).fetchall()
    )
    db.close()
    assert writes == {"/apps/both": 1 + 2 * rounds, "/appstatus/both": 1 + 2 * rounds}, writes
    app = platform.http("GET", "/v1/apps/both").json()
    assert app["max"] in (10 + 2 * (rounds - 1), 11 + 2 * (rounds - 1))
    assert (app["status"]["desired"], app["status"]["scale_reason"]) in (
        (2 * (rounds - 1), f"decision 0.{rounds - 1}"),
        (2 * (rounds - 1) + 1, f"decision 1.{rounds - 1}"),
    )
    assert "desired" not in app and "scale_reason" not in app
    statuses = platform.http("GET", "/v1/appstatus").json()["items"]
    assert [s for s in statuses if s["app"] == "both"] == [app["status"]]
    assert platform.http("DELETE", "/v1/apps/both").status_code == 204


def test_delete_app_removes_every_record_of_it_in_one_transaction(platform: Platform) -> None:
    deployed = platform.deploy(APPS / "configured", "--name", "doomed")
    platform.cli("config", "set", "doomed", "max_items=3", "db_password=-", input="hunter2\n")
    platform.cli("scale", "doomed", "--min", "2")
    platform.wait_for(
        lambda: len([i for i in platform.instances("doomed") if i["status"]["phase"] == "ready"]) == 2,
        what="2 ready instances",
    )
    pids = [i["status"]["pid"] for i in platform.instances("doomed")]
    ids = [i["id"] for i in platform.instances("doomed")]
    # Its usage so far: its node's minute stored, as each minute is (`node.usage`).
    (node,) = {i["node"] for i in platform.instances("doomed")}
    made = platform.http("POST", "/v1/tokens", json={"role": "node", "name": node})
    row = {"hour": int(time.time() // 3600 * 3600), "app": "doomed", "function": "", "cpu_s": 1.0}
    reported = httpx.put(
        f"{platform.api}/v1/nodes/{node}/usage",
        json={"now": {"apps": {}, "instances": []}, "usage": [row]},
        headers={"authorization": f"Bearer {made.json()['token']}"},
        timeout=30,
    )
    assert reported.status_code == 200 and reported.json() == {"rows": 1}, reported.text
    db = sqlite3.connect(f"file:{platform.data_dir / 'state.db'}?mode=ro", uri=True)
    before = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
    keys = [
        "/apps/doomed",
        "/config/doomed",
        "/appstatus/doomed",
        f"/usage/doomed/{row['hour']}",
        f"/deploys/{deployed['id']}",
        *(f"/instances/{i}" for i in ids),
    ]
    assert all(db.execute("SELECT 1 FROM kv WHERE key = ?", (k,)).fetchone() for k in keys)

    r = platform.http("DELETE", "/v1/apps/doomed")
    assert r.status_code == 204
    for path in ("/v1/apps/doomed", "/v1/apps/doomed/releases", "/v1/apps/doomed/config"):
        r = platform.http("GET", path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "app_not_found", path
    assert platform.instances("doomed") == []
    assert all(d["app"] != "doomed" for d in platform.http("GET", "/v1/deploys").json()["items"])
    # Nothing left in the store names it, and everything went at one revision: there is no moment
    # (a kill -9, say) at which half of the app is left.
    # (Values are BLOBs, which LIKE does not read as text.) Kept by design: the uid's claim (never
    # handed out again) and the audit log; a node's live view names it until its next second.
    left = db.execute(
        "SELECT key FROM kv WHERE (key LIKE '%doomed%' OR CAST(value AS TEXT) LIKE '%\"doomed\"%')"
        " AND key NOT LIKE '/uids/%' AND key NOT LIKE '/audit/%' AND key NOT LIKE '/nodeusage/%'"
    ).fetchall()
    assert left == []
    revisions = db.execute(
        "SELECT DISTINCT rev FROM events WHERE type = 'DELETE' AND rev > ?"
        " AND (key LIKE '%doomed%' OR key = ?)",
        (before, f"/deploys/{deployed['id']}"),
    ).fetchall()
    assert len(revisions) == 1, revisions
    deleted = db.execute("SELECT key FROM events WHERE rev = ? ORDER BY key", revisions[0]).fetchall()
    assert {k for (k,) in deleted} >= {*keys, "/confighistory/doomed/00000001", "/releases/doomed/00000001"}
    named = "SELECT 1 FROM kv WHERE key LIKE '/nodeusage/%' AND CAST(value AS TEXT) LIKE '%\"doomed\"%'"
    platform.wait_for(lambda: db.execute(named).fetchone() is None, what="the node's live view to forget it")
    db.close()
    # Its instances end, the gateway no longer knows it, and the name is free for a new app.
    for pid in pids:
        platform.wait_for(lambda pid=pid: not running(pid), what=f"instance pid {pid} to end")
    platform.wait_for(
        lambda: httpx.get(f"{platform.gateway}/doomed/").status_code == 404, what="the gateway to forget it"
    )
    assert platform.http("DELETE", "/v1/apps/doomed").status_code == 404
    again = platform.deploy(APPS / "configured", "--name", "doomed")
    assert again["release"] == 1
    assert (
        platform.http("GET", "/v1/apps/doomed/config").json()["version"] == 0
    )  # no old values, no old secret
    platform.http("DELETE", "/v1/apps/doomed")


def test_an_app_with_a_deploy_building_is_not_deleted(platform: Platform) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "busy"}).status_code == 201
    deploy = platform.upload(APPS / "e2e_slow_import", app="busy")
    platform.wait_for_build_line(deploy["id"], "importing slowly")
    r = platform.http("DELETE", "/v1/apps/busy")
    # deleted now, its release would bring the app back when the build ends
    assert r.status_code == 409 and r.json()["error"]["code"] == "deploy_in_progress"
    assert deploy["id"] in r.json()["error"]["message"]
    platform.wait_for(
        lambda: (
            platform.http("GET", f"/v1/deploys/{deploy['id']}").json()["status"] not in ("queued", "building")
        ),
        what="the build to end",
    )
    assert platform.http("DELETE", "/v1/apps/busy").status_code == 204
    assert platform.http("GET", "/v1/apps/busy").status_code == 404


def test_gateway_traffic_figures_live_in_the_store(own_platform: Platform) -> None:
    """An API restart loses nothing of what the gateways reported (they lived in its memory)."""
    p = own_platform
    assert p.http("POST", "/v1/apps", json={"name": "ghost"}).status_code == 201
    report = {"interval_s": 1.0, "apps": {"ghost": {"concurrency": 2.5, "requests": 7, "waiting": 0}}}
    assert p.http("PUT", "/v1/gateways/far-gw-1/stats", json=report).status_code == 200
    assert p.http("GET", "/v1/stats").json()["apps"]["ghost"]["concurrency"] == 2.5
    p.stop()
    db = sqlite3.connect(f"file:{p.data_dir / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM kv WHERE key = '/gatewaystats/far-gw-1'").fetchone()
    finally:
        db.close()
    assert row is not None and json.loads(row[0])["apps"]["ghost"]["requests"] == 7
