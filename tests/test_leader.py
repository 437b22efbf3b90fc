"""Leader election through the API: one controller process acts; kill it, and another takes over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osless.controllers.leader import default_holder
from tests.platform import ROOT, Platform

APPS = Path(__file__).parent / "apps"


def test_a_leadership_is_taken_only_when_free_and_stepped_down_by_its_holder(platform: Platform) -> None:
    name = f"test-{os.getpid()}"
    first = platform.http("PUT", f"/v1/leaders/{name}", json={"holder": "cand-a", "ttl_s": 1})
    assert first.status_code == 200 and first.json()["holder"] == "cand-a"
    assert (
        platform.http("PUT", f"/v1/leaders/{name}", json={"holder": "cand-a", "ttl_s": 1}).status_code == 200
    )
    taken = platform.http("PUT", f"/v1/leaders/{name}", json={"holder": "cand-b", "ttl_s": 1})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "leader_taken"
    assert "'cand-a'" in taken.json()["error"]["message"]
    # cand-a stops renewing: its lease runs out, and cand-b gets it
    claim = {"holder": "cand-b", "ttl_s": 1}
    got = platform.wait_for(
        lambda: (r := platform.http("PUT", f"/v1/leaders/{name}", json=claim)).status_code == 200 and r,
        timeout=5,
        what="cand-b to take over",
    )
    assert got.json()["holder"] == "cand-b"
    assert platform.http("GET", f"/v1/leaders/{name}").json()["holder"] == "cand-b"
    refused = platform.http("DELETE", f"/v1/leaders/{name}", params={"holder": "cand-a"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_leader"
    assert platform.http("DELETE", f"/v1/leaders/{name}", params={"holder": "cand-b"}).status_code == 204
    assert platform.http("GET", f"/v1/leaders/{name}").status_code == 404
    bad = platform.http("PUT", f"/v1/leaders/{name}", json={"holder": "cand-a", "ttl_s": 0.1})
    assert bad.status_code == 422


def test_a_term_is_kept_and_stepped_down_only_with_the_token_that_took_it(platform: Platform) -> None:
    name = f"bound-{os.getpid()}"
    other = platform.http("POST", "/v1/tokens", json={"role": "controller", "name": "ctl-other"}).json()
    as_other = {"authorization": f"Bearer {other['token']}"}
    claim = {"holder": "same-name", "ttl_s": 30}
    taken = platform.http("PUT", f"/v1/leaders/{name}", json=claim)
    assert taken.status_code == 200 and "token" not in taken.json(), taken.text
    # Another controller naming the same holder neither renews the term nor ends it.
    renewed = platform.http("PUT", f"/v1/leaders/{name}", json=claim, headers=as_other)
    assert renewed.status_code == 409 and renewed.json()["error"]["code"] == "leader_taken", renewed.text
    dropped = platform.http("DELETE", f"/v1/leaders/{name}", params={"holder": "same-name"}, headers=as_other)
    assert dropped.status_code == 409 and "another token" in dropped.json()["error"]["message"], dropped.text
    assert platform.http("PUT", f"/v1/leaders/{name}", json=claim).status_code == 200  # its own token
    assert platform.http("DELETE", f"/v1/leaders/{name}", params={"holder": "same-name"}).status_code == 204
    # A term another token took: an admin ends it too (an operator moving the leadership).
    assert platform.http("PUT", f"/v1/leaders/{name}", json=claim, headers=as_other).status_code == 200
    assert platform.http("DELETE", f"/v1/leaders/{name}", params={"holder": "same-name"}).status_code == 204


def test_default_holders_differ_in_one_process() -> None:
    # Host and pid collide across containers (each one's pid 1): a random part keeps them apart.
    assert len({default_holder() for _ in range(3)}) == 3


def test_campaigning_needs_the_operate_permission(platform: Platform) -> None:
    made = platform.http("POST", "/v1/tokens", json={"role": "read"}).json()
    r = platform.http(
        "PUT",
        "/v1/leaders/controllers",
        json={"holder": "intruder"},
        headers={"authorization": f"Bearer {made['token']}"},
    )
    assert r.status_code == 403 and "operate" in r.json()["error"]["message"]
    assert platform.http("GET", "/v1/leaders/controllers").json()["holder"] != "intruder"


def _controllers(p: Platform, holder: str) -> subprocess.Popen[bytes]:
    log = open(p.data_dir.parent / f"{holder}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "osless.controllers", "--api", p.api, "--holder", holder],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OSLESS_TOKEN": p.token},  # never in argv
        cwd=ROOT,
    )
    log.close()
    return proc


@pytest.fixture
def candidates(own_platform: Platform) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {h: _controllers(own_platform, h) for h in ("ctl-a", "ctl-b")}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def _log(p: Platform, holder: str) -> str:
    return (p.data_dir.parent / f"{holder}.log").read_text(errors="replace")


def _holder(p: Platform) -> str | None:
    r = p.http("GET", "/v1/leaders/controllers")
    return str(r.json()["holder"]) if r.status_code == 200 else None


def test_one_leader_acts_and_another_takes_over_within_seconds_of_its_kill(
    own_platform: Platform, candidates: dict[str, subprocess.Popen[bytes]]
) -> None:
    p = own_platform
    p.deploy(APPS / "holder", "--detach")
    # Three candidates (the two processes and `osless up`'s own): exactly one holds, and keeps it.
    time.sleep(3)
    first = _holder(p)
    assert first is not None and first not in candidates  # `osless up`'s, there first
    for _ in range(6):
        assert _holder(p) == first
        time.sleep(0.5)
    for holder, proc in candidates.items():
        assert proc.poll() is None, _log(p, holder)
        assert "took the leadership" not in _log(p, holder)
    # Move the leadership to one of the processes: its holder steps down (as on a clean stop)
    # until a process wins the next campaign.
    for _ in range(40):
        if (now := _holder(p)) in candidates:
            break
        if now is not None:
            p.http("DELETE", "/v1/leaders/controllers", params={"holder": now})
        time.sleep(0.3)
    leader = _holder(p)
    assert leader in candidates, leader
    p.wait_for(lambda: "took the leadership" in _log(p, leader), timeout=5, what="the leader to know")

    killed_at = time.monotonic()
    candidates[leader].send_signal(signal.SIGKILL)
    p.wait_for(lambda: _holder(p) not in (None, leader), timeout=10, what="another leader")
    took = time.monotonic() - killed_at
    assert took <= 5.0, f"a new leader after {took:.1f}s"

    # The new leader acts: scaling still happens.
    p.cli("scale", "holder", "--min", "2")
    p.wait_for(
        lambda: len([i for i in p.instances("holder") if i["status"]["phase"] == "ready"]) == 2,
        timeout=30,
        what="two ready instances",
    )


def test_the_controllers_process_takes_its_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OSLESS_TOKEN"}
    cmd = [sys.executable, "-m", "osless.controllers", "--api", "http://127.0.0.1:9"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "no token: set OSLESS_TOKEN or pass --token-file FILE" in r.stderr
    r = subprocess.run(
        [*cmd, "--token-file", str(tmp_path / "absent")], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "cannot read the token file" in r.stderr
    r = subprocess.run([*cmd, "--ttl", "0.1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--ttl" in r.stderr
