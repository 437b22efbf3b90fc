"""Builds run in a builder process, never in the API's: what a builder token may do (only on the
deploys it claimed), what the API checks of what it uploads, and what happens when it dies."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.api.routes.builds import MAX_WAITERS
from osless.builder import pack
from osless.images import canonical_json
from tests.platform import EXAMPLES, Platform, running
from tests.test_images import manifest_fields

ORPHANED = "the builder building it stopped: deploy again"


@pytest.fixture(scope="module")
def plat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A platform of this module's own: its tests stop and kill its builder."""
    p = Platform(tmp_path_factory.mktemp("builds") / "data").start()
    try:
        yield p
    finally:
        p.stop()


def slow_app(dest: Path, seconds: int, name: str = "slow") -> Path:
    """An app whose build stays `building` for `seconds` (its import sleeps, and a build imports it)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "app.py").write_text(
        "import sys, time\nimport osless\n"
        "print('importing slowly', file=sys.stderr, flush=True)\n"
        f"time.sleep({seconds})\n"
        f"app = osless.App({name!r})\n"
    )
    return dest


def log_lines(p: Platform, deploy_id: str, **params: str) -> list[dict[str, Any]]:
    r = p.http("GET", f"/v1/deploys/{deploy_id}/log", params=params)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def builder_pid(p: Platform, deploy_id: str) -> int:
    for rec in log_lines(p, deploy_id):
        if m := re.match(r"==> Builder [0-9a-f]+ \(pid (\d+)\)", rec.get("line", "")):
            return int(m.group(1))
    raise AssertionError(f"no builder line in the log of {deploy_id}")


def ended(p: Platform, deploy_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        d: dict[str, Any] = p.http("GET", f"/v1/deploys/{deploy_id}").json()
        return d if d["status"] not in ("queued", "building") else None

    found: dict[str, Any] = p.wait_for(done, timeout=timeout, what=f"deploy {deploy_id} to end")
    return found


def as_token(p: Platform, tok: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        p.api + path,
        headers={"authorization": f"Bearer {tok}", **kw.pop("headers", {})},
        timeout=60,
        **kw,
    )


def builder_token(p: Platform) -> str:
    r = p.http("POST", "/v1/tokens", json={"role": "builder"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_a_deploy_builds_in_a_builder_process_not_the_apis(plat: Platform) -> None:
    deploy = plat.deploy(EXAMPLES / "hello")
    assert deploy["status"] == "succeeded", deploy
    pid = builder_pid(plat, deploy["id"])
    assert plat.proc is not None and pid != plat.proc.pid
    assert b"osless.builder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    stat = Path(f"/proc/{pid}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == plat.proc.pid  # `osless up`'s child
    assert re.fullmatch(r"[0-9a-f]{16}", deploy["builder"])
    # The builder's image store is its own: the same requirements hit its dependency cache again.
    again = plat.deploy(EXAMPLES / "hello")
    assert again["deps_cached"] is True, again


def test_the_api_process_never_imports_the_builder() -> None:
    import subprocess
    import sys

    code = (
        "import sys, osless.server.api, osless.server.up, osless.api.app\n"
        "print(sorted(m for m in sys.modules if m in ('osless.builder.builder', 'osless.builder.egress')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_builder_token_cannot_deploy_read_secrets_or_act_on_deploys_it_did_not_claim(
    plat: Platform,
) -> None:
    hello = plat.deploy(EXAMPLES / "hello")
    tok = builder_token(plat)
    archive = pack(EXAMPLES / "hello")
    gz = {"content-type": "application/gzip"}
    assert as_token(plat, tok, "POST", "/v1/deploys", content=archive, headers=gz).status_code == 403
    assert as_token(plat, tok, "GET", "/v1/apps/hello/config").status_code == 403
    assert as_token(plat, tok, "GET", "/v1/apps").status_code == 403
    assert as_token(plat, tok, "GET", "/v1/deploys").status_code == 403
    node = plat.http("GET", "/v1/nodes").json()["items"][0]["name"]
    assert as_token(plat, tok, "GET", f"/v1/nodes/{node}/apps/hello/config").status_code == 403
    assert (
        as_token(plat, tok, "PUT", "/v1/leaders/controllers", json={"holder": "x", "ttl_s": 3}).status_code
        == 403
    )

    # What the retention keeps, for its own store: digests and numbers, no names; a wait past a pass
    # already seen answers 204. One answer per pass: a pass now, for the release just made.
    assert plat.http("POST", "/v1/retention/collect").status_code == 200
    kept = as_token(plat, tok, "GET", "/v1/builds/kept")
    assert kept.status_code == 200 and set(kept.json()) == {
        "collection",
        "images",
        "locks",
        "uids",
        "grace_s",
    }
    assert hello["image"] in kept.json()["images"] and kept.json()["collection"] > 0
    again = as_token(plat, tok, "GET", "/v1/builds/kept", params={"after": kept.json()["collection"]})
    assert again.status_code == 204, again.text

    mine = as_token(plat, tok, "POST", "/v1/builders").json()["name"]
    other = as_token(plat, builder_token(plat), "POST", "/v1/builders").json()["name"]
    # A deploy it did not claim (the platform's builder built it): no log, no source, no result.
    base, q = f"/v1/builds/{hello['id']}", {"builder": mine}
    for method, path, kw in (
        ("POST", "/log", {"json": {"lines": ["forged"]}}),
        ("GET", "/source", {}),
        ("POST", "/result", {"json": {"error": "forged"}}),
    ):
        r = as_token(plat, tok, method, base + path, params=q, **kw)
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_claimed", r.text
    # Another token's builder name is not its to use.
    r = as_token(plat, tok, "POST", "/v1/builds/claim", params={"builder": other})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_this_builder", r.text

    # The platform's builder stopped, a deploy stays queued for this one to claim, once. (A claim
    # the stopped builder had in flight, answered by the API, takes the first one uploaded.)
    pid = builder_pid(plat, hello["id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        queued = plat.upload(EXAMPLES / "hello", app="hellotwo")
        time.sleep(0.5)
        got = as_token(plat, tok, "POST", "/v1/builds/claim", params={"builder": mine})
        if got.status_code == 204:
            queued = plat.upload(EXAMPLES / "hello", app="hellotwo")
            got = as_token(plat, tok, "POST", "/v1/builds/claim", params={"builder": mine})
        assert got.status_code == 200 and got.json()["id"] == queued["id"], got.text
        assert got.json()["status"] == "building" and got.json()["builder"] == mine
        r = as_token(plat, tok, "POST", "/v1/builds/claim", params={"builder": mine})
        assert r.status_code == 204, r.text  # nothing else queued: never the same deploy twice
        base, q = f"/v1/builds/{queued['id']}", {"builder": mine}
        assert as_token(plat, tok, "GET", base + "/source", params=q).content == archive
        bad = b"not what the digest says"
        r = as_token(
            plat,
            tok,
            "PUT",
            f"{base}/layers/{hashlib.sha256(b'other bytes').hexdigest()}",
            params=q,
            content=bad,
            headers={"content-type": "application/x-tar"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "digest_mismatch", r.text
        # A manifest naming a layer the API does not have, or another app, is refused.
        app = as_token(plat, tok, "POST", base + "/app", params=q, json={"name": "other"}).json()
        assert app["app"] == "hellotwo" and app["uid"] > 0  # named at upload (`?app=`): that wins
        data = canonical_json(manifest_fields(app="evil"))
        r = as_token(plat, tok, "PUT", base + "/image", params=q, content=data)
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_app", r.text
        # Nor one that is not a manifest: the contract names what is wrong.
        data = canonical_json(manifest_fields(app="hellotwo", functions={"f": {"memory_mb": 1 << 20}}))
        r = as_token(plat, tok, "PUT", base + "/image", params=q, content=data)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_manifest", r.text
        assert "functions.f.memory_mb: Input should be less than or equal to 65536" in r.text, r.text
        # Nor may it point another app's layer at an archive of its own: the layer's record stays,
        # so that app's archive is neither served in its place nor collected from under its release.
        store = plat.data_dir / "images"
        theirs = json.loads((store / "manifests" / f"{hello['image']}.json").read_bytes())["layers"]["code"]
        record = (store / "archived" / f"{theirs}.json").read_bytes()
        own = b"an archive of its own"
        sha = hashlib.sha256(own).hexdigest()
        r = as_token(plat, tok, "PUT", f"{base}/layers/{sha}", params=q, content=own)
        assert r.status_code == 204, r.text
        ref = {"sha256": sha, "size": len(own)}
        forged = manifest_fields(
            app="hellotwo",
            layers={"code": theirs, "deps": hashlib.sha256(b"its deps").hexdigest()},
            layer_archives={"code": ref, "deps": ref},
        )
        r = as_token(plat, tok, "PUT", base + "/image", params=q, content=canonical_json(forged))
        assert r.status_code == 200, r.text
        assert (store / "archived" / f"{theirs}.json").read_bytes() == record
        # Nor is another app's image released by it.
        r = as_token(plat, tok, "POST", base + "/result", params=q, json={"image": hello["image"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_app", r.text
        # The other builder cannot end it; this one can.
        r = as_token(plat, tok, "POST", base + "/result", params={"builder": other}, json={"error": "x"})
        assert r.status_code == 409, r.text
        r = as_token(plat, tok, "POST", base + "/result", params=q, json={"error": "given up by the test"})
        assert r.status_code == 200 and r.json()["status"] == "failed", r.text
        r = as_token(plat, tok, "POST", base + "/result", params=q, json={"error": "again"})
        assert r.status_code == 409, r.text
        lines = [rec.get("line") for rec in log_lines(plat, queued["id"])]
        assert lines[-2] == "==> Build failed: given up by the test", lines
    finally:
        os.kill(pid, signal.SIGCONT)
        as_token(plat, tok, "DELETE", f"/v1/builders/{mine}")


def test_the_build_log_reads_the_same_followed_as_after_the_end(plat: Platform, tmp_path: Path) -> None:
    deploy = plat.upload(slow_app(tmp_path / "s", 1, "slowlog"))
    with httpx.stream(
        "GET",
        f"{plat.api}/v1/deploys/{deploy['id']}/log",
        params={"follow": "true"},
        headers={"authorization": f"Bearer {plat.token}"},
        timeout=120,
    ) as r:
        followed = [json.loads(line) for line in r.iter_lines()]
    after = log_lines(plat, deploy["id"])
    assert followed[:-1] == after[:-1]
    assert followed[-1]["deploy"]["status"] == after[-1]["deploy"]["status"] == "succeeded"
    assert after[-2]["line"].startswith("==> Released slowlog v1")
    out = plat.cli("deploy", str(tmp_path / "s")).stdout
    assert "Released slowlog v2" in out or "slowlog v2" in out, out


def test_a_builder_killed_mid_build_has_its_deploy_failed_and_the_next_builds(
    plat: Platform, tmp_path: Path
) -> None:
    src = slow_app(tmp_path / "slow", 60)
    deploy = plat.upload(src)
    plat.wait_for_build_line(deploy["id"], "importing slowly")
    pid = builder_pid(plat, deploy["id"])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    failed = ended(plat, deploy["id"], timeout=30)
    assert failed["status"] == "failed" and failed["error"] == ORPHANED, failed
    assert time.monotonic() - killed < 20  # the lease (10 s) and a sweep (2 s)
    assert log_lines(plat, deploy["id"])[-2]["line"] == f"==> Build failed: {ORPHANED}"
    # `osless up` started a new builder: it builds the next deploy.
    nxt = plat.deploy(EXAMPLES / "hello")
    assert nxt["status"] == "succeeded" and builder_pid(plat, nxt["id"]) != pid

    # Stopped (SIGTERM) mid-build, a builder fails its build at once, saying why.
    again = plat.upload(src)
    plat.wait_for_build_line(again["id"], "importing slowly")
    pid = builder_pid(plat, again["id"])
    os.kill(pid, signal.SIGTERM)
    stopped = ended(plat, again["id"], timeout=30)
    assert stopped["error"] == "the builder stopped mid-build: deploy again", stopped
    plat.wait_for(lambda: not running(pid), timeout=20, what="the builder to exit")


def test_a_second_builder_on_a_builders_folder_stops_at_once_saying_so(
    plat: Platform, tmp_path: Path
) -> None:
    # Its sweep would remove what the first builder's builds use: it must not start. (The first is
    # this test, holding the folder's lock as a builder does, so no restart of the platform's races.)
    folder = tmp_path / "builder"
    folder.mkdir()
    env = {**plat.env, "OSLESS_BUILDER_TOKEN": builder_token(plat)}
    with (folder / "builder.lock").open("ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run(
            [plat.osless, "builder", "--api", plat.api, "--data-dir", str(folder), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 1, r.stdout + r.stderr
    error = json.loads(r.stdout)["error"]
    assert str(folder) in error["message"] and "--data-dir" in error["message"], error


def test_long_polls_past_the_cap_are_refused_with_429_and_a_pass_is_answered_once(plat: Platform) -> None:
    tok = builder_token(plat)
    assert plat.http("POST", "/v1/retention/collect").status_code == 200
    first = as_token(plat, tok, "GET", "/v1/builds/kept")
    assert first.status_code == 200, first.text
    mine = as_token(plat, tok, "POST", "/v1/builders").json()["name"]

    async def polls(n: int, path: str, params: dict[str, Any]) -> list[httpx.Response]:
        auth = {"authorization": f"Bearer {tok}"}
        async with httpx.AsyncClient(base_url=plat.api, headers=auth, timeout=60) as c:
            return await asyncio.gather(*(c.request(method_of(path), path, params=params) for _ in range(n)))

    try:
        for path in ("/v1/builds/kept", "/v1/builds/claim"):
            for _ in range(3):  # again if a pass of the collector ended the waits meanwhile
                after = as_token(plat, tok, "GET", "/v1/builds/kept").json()["collection"]
                params = {"builder": mine, "after": after, "wait_s": 2}
                got = asyncio.run(polls(MAX_WAITERS + 2, path, params))
                if all(r.status_code != 200 for r in got):
                    break
            refused = [r for r in got if r.status_code == 429]
            assert refused and all(r.json()["error"]["code"] == "too_many_waiters" for r in refused), path
            assert {r.status_code for r in got} == {204, 429}, [r.text for r in got]
            assert as_token(plat, tok, method_of(path), path, params=params).status_code == 204  # let go
    finally:
        as_token(plat, tok, "DELETE", f"/v1/builders/{mine}")
    # One answer per pass of the collector: an app made since is in the next pass's, not in this one's.
    plat.deploy(EXAMPLES / "hello", "--name", "keptlater")
    again = as_token(plat, tok, "GET", "/v1/builds/kept")
    if again.json()["collection"] == first.json()["collection"]:
        assert again.json() == first.json()


def method_of(path: str) -> str:
    return "POST" if path.endswith("claim") else "GET"
