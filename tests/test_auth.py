"""The API's own defences: authentication before routing, roles and app scopes, expiry and revocation,
the audit log, requests per token, and the `osless tokens` and `osless audit` commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from osless.api import audit
from osless.api.app import _check_permissions
from osless.api.auth import Tokens
from osless.store import SQLiteStore
from tests.platform import OSLESS, Platform


def make_token(platform: Platform, role: str, **extra: Any) -> dict[str, Any]:
    r = platform.http("POST", "/v1/tokens", json={"role": role, **extra})
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


def call(platform: Platform, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}", **kw.pop("headers", {})}
    return httpx.request(method, platform.api + path, headers=headers, timeout=60, **kw)


def cli_as(platform: Platform, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**platform.env, "OSLESS_TOKEN": token}
    return subprocess.run([OSLESS, *args], env=env, capture_output=True, text=True, timeout=60)


def test_strangers_learn_nothing_of_the_routes(platform: Platform) -> None:
    probes = [
        ("GET", "/nope"),  # unknown: 404 once authenticated
        ("DELETE", "/v1/status"),  # wrong method: 405
        ("GET", "/v1/apps/"),  # trailing slash: a 307 redirect
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("POST", "/v1/apps/hello/rollback"),
        ("GET", "/v1/apps"),
    ]
    for headers in ({}, {"authorization": "Bearer osl_made-up"}, {"authorization": "Basic YTpi"}):
        for method, path in probes:
            r = httpx.request(method, platform.api + path, headers=headers, follow_redirects=False)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(platform.api + "/healthz").json() == {"ok": True}
    # once authenticated, routing answers as it always did
    assert platform.http("GET", "/nope").status_code == 404
    assert platform.http("DELETE", "/v1/status").status_code == 405
    assert "/v1/apps" in platform.http("GET", "/openapi.json").json()["paths"]


# One representative route per permission, and the roles that hold it.
ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "read": ("GET", "/v1/apps/hello/releases", {}),
    "describe": ("GET", "/v1/apps/hello/endpoints", {}),
    "logs": ("GET", "/v1/apps/hello/logs?tail=1", {}),
    "deploy": ("PUT", "/v1/apps/hello/scale", {"json": {"min": 1}}),
    "invoke": ("POST", "/v1/apps/hello/functions/greet:invoke", {"json": {"name": "Ada"}}),
    "route": ("POST", "/v1/apps/hello/wake", {}),
    "report": ("PUT", "/v1/nodes/auth-probe/calls", {"json": {"calls": []}}),
    "operate": ("POST", "/v1/instances", {"json": {}}),  # allowed: the body's 422, past the 403
    "admin": ("GET", "/v1/tokens", {}),
    "secrets": ("GET", "/v1/nodes/any/apps/hello/config", {}),
    "debug": ("POST", "/v1/apps/hello/debug/stack", {}),
}
ALLOWED = {
    # `egress` (a node's proxy calling as one of its apps) has no route here: tests/test_invoker.py.
    "admin": {
        "read",
        "describe",
        "logs",
        "deploy",
        "invoke",
        "egress",
        "operate",
        "report",
        "route",
        "pull",
        "admin",
        "debug",
    },
    "deploy": {"read", "describe", "deploy", "invoke"},
    "read": {"read", "describe"},
    "debug": {"read", "describe", "logs", "debug"},
    "invoke": {"invoke"},
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_reaches_what_it_may_and_nothing_else(
    platform: Platform, hello: dict[str, Any], role: str
) -> None:
    token = make_token(platform, role)["token"]
    for permission, (method, path, kw) in ROUTES.items():
        r = call(platform, token, method, path, **kw)
        if permission in ALLOWED[role]:
            assert r.is_success or (permission == "operate" and r.status_code == 422), (
                role,
                permission,
                r.text,
            )
        else:
            assert r.status_code == 403, (role, permission, r.status_code, r.text)
            assert r.json()["error"]["code"] == "forbidden"
    who = call(platform, token, "GET", "/v1/whoami").json()
    permissions = who.pop("permissions")
    assert who == {"name": role, "role": role, "app": None, "expires_at": None}
    assert set(permissions) == ALLOWED[role] | {"whoami"}, permissions  # what the gateway reads


def test_an_app_scoped_token_reaches_only_its_app(platform: Platform, hello: dict[str, Any]) -> None:
    platform.http("POST", "/v1/apps", json={"name": "scope-other"})
    made = make_token(platform, "deploy", app="hello", name="ci-hello")
    token = made["token"]
    assert call(platform, token, "GET", "/v1/whoami").json() == {
        "name": "ci-hello",
        "role": "deploy",
        "app": "hello",
        "expires_at": None,
        "permissions": ["deploy", "describe", "invoke", "read", "whoami"],
    }
    assert call(platform, token, "GET", "/v1/apps/hello").status_code == 200
    assert call(platform, token, "PUT", "/v1/apps/hello/scale", json={"min": 1}).status_code == 200
    refused = [
        ("GET", "/v1/apps/scope-other", {}),
        ("PUT", "/v1/apps/scope-other/scale", {"json": {"min": 0}}),
        ("DELETE", "/v1/apps/scope-other", {}),
        ("POST", "/v1/apps", {"json": {"name": "scope-new"}}),
        ("GET", "/v1/instances?app=scope-other", {}),
        ("GET", "/v1/nodes", {}),  # nodes concern no one app
        (
            "POST",
            "/v1/deploys?app=scope-other",
            {"content": b"x", "headers": {"content-type": "application/gzip"}},
        ),
    ]
    for method, path, kw in refused:
        r = call(platform, token, method, path, **kw)
        assert r.status_code == 403, (method, path, r.status_code)
    # app-less lists show only what concerns the app
    assert [a["name"] for a in call(platform, token, "GET", "/v1/apps").json()["items"]] == ["hello"]
    assert {i["app"] for i in call(platform, token, "GET", "/v1/instances").json()["items"]} == {"hello"}
    assert call(platform, token, "GET", "/v1/status").json()["apps"] == 1
    assert {d["app"] for d in call(platform, token, "GET", "/v1/deploys").json()["items"]} == {"hello"}
    assert platform.http("GET", "/v1/status").json()["apps"] >= 2
    r = platform.http("POST", "/v1/tokens", json={"role": "admin", "app": "hello"})
    assert r.status_code == 422


def test_expired_tokens_are_refused(platform: Platform) -> None:
    made = make_token(platform, "read", expires_in_s=1.5)
    assert made["expires_at"] == pytest.approx(time.time() + 1.5, abs=1)
    assert call(platform, made["token"], "GET", "/v1/apps").status_code == 200
    time.sleep(max(0.0, made["expires_at"] - time.time()) + 0.1)
    r = call(platform, made["token"], "GET", "/v1/apps")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "token_expired"
    assert r.json()["error"]["message"].startswith("token expired")
    listed = {t["id"]: t for t in platform.http("GET", "/v1/tokens").json()["items"]}
    assert listed[made["id"]]["expired"] is True


def test_a_revoked_token_stops_working(platform: Platform) -> None:
    made = make_token(platform, "read")
    assert call(platform, made["token"], "GET", "/v1/apps").status_code == 200  # now in the cache
    assert platform.http("DELETE", f"/v1/tokens/{made['id']}").status_code == 204
    r = call(platform, made["token"], "GET", "/v1/apps")
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid token"
    assert platform.http("DELETE", f"/v1/tokens/{made['id']}").status_code == 404
    ids = [t["id"] for t in platform.http("GET", "/v1/tokens").json()["items"]]
    assert made["id"] not in ids


def test_the_node_token_cannot_be_revoked(platform: Platform) -> None:
    node = next(t for t in platform.http("GET", "/v1/tokens").json()["items"] if t["role"] == "node")
    r = platform.http("DELETE", f"/v1/tokens/{node['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "node_token"


def test_writes_are_audited_with_who_what_and_where(platform: Platform, hello: dict[str, Any]) -> None:
    since = time.time()
    made = make_token(platform, "deploy", name="auditor")
    token = made["token"]
    assert call(platform, token, "PUT", "/v1/apps/hello/scale", json={"min": 1}).status_code == 200
    assert call(platform, token, "POST", "/v1/apps/hello/wake").status_code == 403  # refused: recorded
    assert call(platform, token, "PUT", "/v1/apps/hello/scale", json={"min": "x"}).status_code == 422
    assert call(platform, token, "GET", "/v1/apps/hello").status_code == 200  # a read: not recorded
    assert call(platform, token, "POST", "/v1/nope").status_code == 404  # no route reached: not recorded
    httpx.put(platform.api + "/v1/apps/hello/scale", json={"min": 1})  # no token: not recorded
    time.sleep(1.5)  # the agent's heartbeats and status reports go on meanwhile: none is recorded

    def audited() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        items = platform.http("GET", "/v1/audit", params={"since": since}).json()["items"]
        mine = [e for e in items if e["token"] == made["id"]]
        return (items, mine) if len(mine) >= 3 else None

    # Each entry is written once its answer is sent: the last may land after that, under load.
    items, mine = platform.wait_for(audited, timeout=15, what="the auditor's three writes in the audit")
    assert [(e["method"], e["path"], e["status"]) for e in reversed(mine)] == [
        ("PUT", "/v1/apps/hello/scale", 200),
        ("POST", "/v1/apps/hello/wake", 403),
        ("PUT", "/v1/apps/hello/scale", 422),
    ]
    for e in mine:
        assert (e["name"], e["role"], e["app"], e["client"]) == ("auditor", "deploy", "hello", "127.0.0.1")
        assert since <= e["at"] <= time.time()
    creation = [e for e in items if e["method"] == "POST" and e["path"] == "/v1/tokens"]
    assert creation and creation[-1]["role"] == "admin" and creation[-1]["status"] == 201
    assert not [e for e in items if e["role"] == "node"]
    assert not [e for e in items if e["method"] in ("GET", "HEAD") or e["token"] is None]
    only_hello = platform.http("GET", "/v1/audit", params={"app": "hello", "since": since}).json()["items"]
    assert only_hello and {e["app"] for e in only_hello} == {"hello"}
    # the audit log is the admin's alone
    assert call(platform, token, "GET", "/v1/audit").status_code == 403


def test_expired_tokens_are_collected_after_their_grace(tmp_path: Path) -> None:
    async def main() -> list[str]:
        store = SQLiteStore(tmp_path / "state.db")
        await store.start()
        try:
            tokens = Tokens(store)
            expired, _, _ = await tokens.issue("old", "read", expires_at=time.time() - 10)
            recent, _, _ = await tokens.issue("recent", "read", expires_at=time.time() - 1)
            await tokens.issue("forever", "read")
            await tokens.issue("later", "read", expires_at=time.time() + 3600)
            assert await tokens.lookup(expired) is not None  # refused as expired, not unknown, until then
            assert await tokens.collect_expired(grace_s=5) == 1
            assert await tokens.lookup(expired) is None and await tokens.lookup(recent) is not None
            return sorted(r.name for _, r in await tokens.list())
        finally:
            await store.close()

    assert asyncio.run(main()) == ["forever", "later", "recent"]


def test_audit_keeps_the_newest_entries_within_the_age_limit(tmp_path: Path) -> None:
    async def main() -> tuple[list[str], list[str]]:
        store = SQLiteStore(tmp_path / "state.db")
        await store.start()
        try:
            fields: dict[str, Any] = {"token": "t", "name": "n", "role": "admin", "status": 200}
            for i in range(12):
                await audit.record(
                    store, method="POST", path=f"/v1/x/{i}" + "y" * 1000, app=None, client=None, **fields
                )
            assert await audit.prune(store, max_entries=5) == 7
            kept = [e["path"].split("y")[0] for e in await audit.query(store, limit=100)]
            time.sleep(0.2)
            await audit.record(store, method="PUT", path="/v1/new", app="a", client="::1", **fields)
            assert await audit.prune(store, max_age_s=0.1) == 5
            left = [e["path"] for e in await audit.query(store, limit=100)]
            return kept, left
        finally:
            await store.close()

    kept, left = asyncio.run(main())
    assert kept == [f"/v1/x/{i}" for i in (11, 10, 9, 8, 7)]
    assert left == ["/v1/new"]


def test_audit_entries_are_capped(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        store = SQLiteStore(tmp_path / "state.db")
        await store.start()
        try:
            entry = await audit.record(
                store,
                token="t",
                name="n" * 500,
                role="admin",
                method="POST",
                path="/v1/" + "p" * 100_000,
                status=200,
                app=None,
                client=None,
            )
            kv = await store.get(audit.PREFIX + entry.id)
            assert kv is not None
            return dict(json.loads(kv.value))
        finally:
            await store.close()

    stored = asyncio.run(main())
    assert len(stored["path"]) == audit.PATH_CAP and stored["path"].endswith("…")
    assert len(stored["name"]) == audit.FIELD_CAP


def flood(platform: Platform, token: str, limit: int = 3000) -> httpx.Response:
    """Requests as fast as one connection goes, until the first 429."""
    with httpx.Client(base_url=platform.api, headers={"authorization": f"Bearer {token}"}) as c:
        for _ in range(limit):
            r = c.get("/v1/whoami")
            if r.status_code == 429:
                return r
    raise AssertionError(f"no 429 after {limit} requests")


def test_a_token_past_its_rate_gets_429_then_goes_on(platform: Platform) -> None:
    token = make_token(platform, "read")["token"]
    r = flood(platform, token)
    assert r.json()["error"]["code"] == "too_many_requests"
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 2
    assert platform.http("GET", "/v1/whoami").status_code == 200  # every token has its own bucket
    time.sleep(wait)
    assert call(platform, token, "GET", "/v1/whoami").status_code == 200


def test_failed_authentication_is_limited_per_address(platform: Platform) -> None:
    r = flood(platform, "osl_made-up")
    assert r.json()["error"]["code"] == "too_many_requests"
    assert int(r.headers["retry-after"]) >= 1
    assert platform.http("GET", "/v1/whoami").status_code == 200  # a good token still gets in
    time.sleep(int(r.headers["retry-after"]))
    assert call(platform, "osl_made-up", "GET", "/v1/whoami").status_code == 401


def test_tokens_and_audit_commands(platform: Platform) -> None:
    since = time.time()
    made = platform.cli_json("tokens", "create", "--role", "read", "--name", "cli-made", "--expires", "1h")
    assert made["role"] == "read" and made["name"] == "cli-made" and made["token"].startswith("osl_")
    assert made["expires_at"] == pytest.approx(since + 3600, abs=60)
    assert cli_as(platform, made["token"], "apps", "--json").returncode == 0
    plain = platform.cli("tokens", "create", "--role", "debug", "--app", "hello")
    token = plain.stdout.strip()
    assert token.startswith("osl_") and "\n" not in token  # the token alone on stdout
    assert "debug" in plain.stderr and "hello" in plain.stderr
    listed = platform.cli_json("tokens", "ls")
    mine = next(t for t in listed if t["id"] == made["id"])
    assert mine["last_used_at"] is not None and mine["last_used_at"] >= since - 1
    assert all("token" not in t for t in listed)
    shown = platform.cli("tokens", "ls").stdout
    assert (
        "cli-made" in shown and "debug-hello" in shown and made["token"] not in shown and token not in shown
    )
    assert platform.cli_json("tokens", "revoke", made["id"]) == {"id": made["id"], "revoked": True}
    refused = cli_as(platform, made["token"], "apps")
    assert refused.returncode == 1 and "invalid token" in refused.stderr
    entries = platform.cli_json("audit", "--since", "1m")
    revoke = [e for e in entries if e["method"] == "DELETE" and e["path"] == f"/v1/tokens/{made['id']}"]
    assert revoke and revoke[0]["status"] == 204 and revoke[0]["role"] == "admin"
    table = platform.cli("audit", "--since", "1m").stdout
    assert f"DELETE /v1/tokens/{made['id']}" in table
    for bad, says in (
        (
            ["--role", "root"],
            "should be 'admin', 'deploy', 'read', 'debug', 'invoke', 'node', 'controller' or 'builder'",
        ),
        (["--role", "read", "--expires", "3x"], "--expires"),
        (["--role", "admin", "--app", "hello"], "cannot be limited"),
    ):
        r = platform.cli("tokens", "create", *bad, check=False)
        assert r.returncode == 1 and says in r.stderr, (bad, r.stderr)
    r = platform.cli("tokens", "revoke", "0123456789ab", check=False)
    assert r.returncode == 1 and "no token" in r.stderr


def test_a_route_without_a_permission_stops_the_api() -> None:
    router = APIRouter()

    @router.get("/open")
    async def open_route() -> int:
        return 1

    with pytest.raises(RuntimeError, match=r"/open \(GET\) declares no permission"):
        _check_permissions(router)


def test_a_made_up_scoped_token_with_a_non_ascii_digit_is_a_401(platform: Platform) -> None:
    # str.isdigit() holds for '²' (Latin-1 0xB2), which int() refuses: the guard then raised (a 500
    # and a traceback in the API's log per request, before the strangers' rate was counted).
    for token in (b"osli_shop_x_\xb2_abc", b"oslr_shop_x_\xb2_abc", b"oslp_platform_x_\xb2_abc"):
        for header in (b"authorization", b"x-amz-security-token"):
            value = b"Bearer " + token if header == b"authorization" else token
            r = httpx.post(
                platform.api + "/2015-03-31/functions/shop.quote/invocations", headers=[(header, value)]
            )
            assert r.status_code == 401, (token, header, r.status_code, r.text[:200])
