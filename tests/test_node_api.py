"""Logs across nodes: each node serves its instances' logs from its own disk (the node API), the API
merges them by time, and a node that does not answer costs its lines, said, never the answer."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.node.api import HEAD_TIMEOUT_S, MAX_CONNECTIONS
from tests.platform import OSLESS, AuthRecorder, Node, Platform, recv_until

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Node]]:
    """A platform and a second node, with the logger app's two instances one on each."""
    root = tmp_path_factory.mktemp("fleet")
    platform = Platform(root / "data").start()
    second_dir = root / "second"
    node = Node(platform, "second", second_dir)
    try:
        node.start()
        platform.deploy(APPS / "logger")
        platform.cli("scale", "logger", "--min", "2", "--max", "2")
        platform.wait_for(
            lambda: (
                {i["node"] for i in platform.instances("logger") if i["status"]["phase"] == "ready"}
                == {platform_node(platform), "second"}
            ),
            timeout=60,
            what="an instance of logger ready on each node",
        )
        yield platform, node
    finally:
        node.stop()
        platform.stop()


def platform_node(platform: Platform) -> str:
    return next(n["name"] for n in platform.cli_json("nodes") if n["name"] != "second")


def sources(platform: Platform, app: str = "logger") -> dict[str, str]:
    """instance id -> its node."""
    return {i["id"]: i["node"] for i in platform.instances(app)}


def say_until_both_heard(platform: Platform, word: str, heard: Any, app: str = "logger") -> None:
    """Invoke APP.say with `word`-N until `heard()` has lines of both instances."""
    n = 0

    def both() -> bool:
        nonlocal n
        n += 1
        status, _ = platform.invoke(app, "say", {"word": f"{word}-{n}"})
        assert status == 200
        heard_from = {r["source"] for r in heard() if r["line"].startswith(f"said {word}-")}
        return heard_from >= set(sources(platform, app))

    platform.wait_for(both, timeout=60, what=f"lines of {word} from both nodes' instances")


def records(platform: Platform, *args: str, app: str = "logger") -> list[dict[str, Any]]:
    return [json.loads(line) for line in platform.cli("logs", app, "--json", *args).stdout.splitlines()]


def test_logs_merge_the_instances_of_both_nodes_in_time_order(fleet: tuple[Platform, Node]) -> None:
    platform, _ = fleet
    say_until_both_heard(platform, "merged", lambda: records(platform, "--tail", "1000"))
    got = [r for r in records(platform, "--tail", "1000") if r["line"].startswith("said merged-")]
    assert {sources(platform)[r["source"]] for r in got} == {platform_node(platform), "second"}
    assert [r["ts"] for r in got] == sorted(r["ts"] for r in got)
    # Each node's lines came from its own disk: the second node's are in its data dir only.
    second = next(i for i, node in sources(platform).items() if node == "second")
    assert (fleet[1].data_dir / "logs" / "apps" / "logger" / f"{second}.log").exists()
    assert not (platform.data_dir / "logs" / "apps" / "logger" / f"{second}.log").exists()
    # The tail is the last N overall, and --instance still picks one.
    everything = records(platform, "--tail", "1000")
    assert len(everything) >= 2 and records(platform, "--tail", "2") == everything[-2:]
    only = records(platform, "--tail", "1000", "--instance", second)
    assert only and {r["source"] for r in only} == {second}


def test_a_stack_reads_the_instances_of_both_nodes(fleet: tuple[Platform, Node]) -> None:
    """`osless debug stack` (tests/test_debug.py) asks each instance's own node, as logs do."""
    platform, _ = fleet
    stacks = platform.cli_json("debug", "stack", "logger")
    assert {(i["instance"], i["node"]) for i in stacks["items"]} == set(sources(platform).items())
    for item in stacks["items"]:
        assert item["error"] is None and any(t["name"] == "MainThread" for t in item["threads"]), item


def test_follow_shows_new_lines_of_both_nodes(fleet: tuple[Platform, Node]) -> None:
    platform, _ = fleet
    follower = subprocess.Popen(
        [OSLESS, "logs", "logger", "-f", "--tail", "0", "--json"], env=platform.env, stdout=subprocess.PIPE
    )
    seen: list[dict[str, Any]] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            seen.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        say_until_both_heard(platform, "followed", lambda: list(seen))
    finally:
        follower.terminate()
        follower.wait(10)
        reader.join(5)
        assert follower.stdout is not None
        follower.stdout.close()


def node_api(platform: Platform, name: str) -> str:
    url: str = next(n for n in platform.cli_json("nodes") if n["name"] == name)["api"]
    return url


def test_the_node_api_decides_as_the_api_would(fleet: tuple[Platform, Node]) -> None:
    platform, _ = fleet
    platform.cli("deploy", str(APPS / "e2e_crashy"), "--name", "other")
    say_until_both_heard(platform, "authz", lambda: records(platform, "--tail", "1000"))
    url = f"{node_api(platform, 'second')}/logs/apps/logger?tail=5"

    def get(token: str | None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url, headers=headers, timeout=30)

    def token(*args: str) -> str:
        made: str = platform.cli_json("tokens", "create", *args)["token"]
        return made

    refused = get(None)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert get("osl_made-up").status_code == 401
    other = get(token("--role", "debug", "--app", "other"))
    assert other.status_code == 403 and "limited to app 'other'" in other.json()["error"]["message"]
    reader = get(token("--role", "read"))
    assert reader.status_code == 403 and "'logs'" in reader.json()["error"]["message"]
    for allowed in (token("--role", "debug", "--app", "logger"), platform.token):
        ok = get(allowed)
        assert ok.status_code == 200, ok.text
        lines = [json.loads(line) for line in ok.text.splitlines()]
        # Records may also carry a request id, a level, an access line's fields (tests/test_logs.py).
        assert lines and all(set(r) >= {"ts", "source", "stream", "line"} for r in lines)
    # A heartbeat names a node API by its http(s) origin only: the API sends callers' tokens there.
    for bad_url in ("file:///etc/passwd", "http://user:pw@host:1", "http://host:1/path", "gopher://x"):
        r = platform.http("PUT", "/v1/nodes/bogus", json={"api": bad_url})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (bad_url, r.text)
    # Bad input is a clear 400, never a path outside the app's folder.
    bad = httpx.get(f"{node_api(platform, 'second')}/logs/apps/logger?instance=..", timeout=30)
    assert bad.status_code == 400 and "instance id" in bad.json()["error"]["message"]
    for query, said in (
        ("request=../x", "request id"),
        ("since=soon", "since"),
        ("grep=" + "x" * 300, "grep"),
    ):
        bad = httpx.get(f"{node_api(platform, 'second')}/logs/apps/logger?{query}", timeout=30)
        assert bad.status_code == 400 and said in bad.json()["error"]["message"], bad.text


def test_the_node_api_caps_its_connections_and_the_time_to_a_request(fleet: tuple[Platform, Node]) -> None:
    platform, _ = fleet
    url = httpx.URL(node_api(platform, "second"))
    address = (str(url.host), int(url.port or 80))
    held = [socket.create_connection(address, timeout=15) for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(address, timeout=15) as extra:
            answer = recv_until(extra, lambda b: b"\r\n\r\n" in b)
            assert answer.startswith(b"HTTP/1.1 503"), answer
        # Those that never sent a request's head are let go.
        started = time.monotonic()
        held[0].settimeout(HEAD_TIMEOUT_S + 10)
        assert held[0].recv(1024) == b""
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 5
    finally:
        for s in held:
            s.close()
    platform.wait_for(
        lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=15, what="the node API"
    )


def test_a_new_app_of_a_deleted_app_s_name_never_reads_its_logs(fleet: tuple[Platform, Node]) -> None:
    platform, node = fleet
    platform.deploy(APPS / "logger", "--name", "reborn")
    platform.cli("scale", "reborn", "--min", "2", "--max", "2")
    platform.wait_for(
        lambda: (
            {i["node"] for i in platform.instances("reborn") if i["status"]["phase"] == "ready"}
            == {platform_node(platform), "second"}
        ),
        timeout=60,
        what="an instance of reborn ready on each node",
    )
    say_until_both_heard(
        platform, "old", lambda: records(platform, "--tail", "1000", app="reborn"), app="reborn"
    )
    assert platform.http("DELETE", "/v1/apps/reborn").status_code == 204
    platform.wait_for(lambda: platform.instances("reborn") == [], what="reborn's instances to go")
    # Each node removes its own copy of the old app's logs once nothing of it runs there.
    old = node.data_dir / "logs" / "apps" / "reborn"
    platform.wait_for(lambda: not old.exists(), timeout=30, what="the second node to remove reborn's logs")
    assert not [p for p in old.parent.iterdir() if "reborn" in p.name]  # nor left any aside
    platform.deploy(APPS / "logger", "--name", "reborn")
    status, _ = platform.invoke("reborn", "say", {"word": "new-1"})
    assert status == 200
    got = platform.wait_for(
        lambda: (
            [r for r in records(platform, "--tail", "1000", app="reborn") if r["line"] == "said new-1"]
            and records(platform, "--tail", "1000", app="reborn")
        ),
        what="the new app's line",
    )
    assert not [r for r in got if r["line"].startswith("said old-")], got
    assert not [r for r in got if r["source"] == "osless"], got
    direct = httpx.get(
        f"{node_api(platform, 'second')}/logs/apps/reborn?tail=1000",
        headers={"authorization": f"Bearer {platform.token}"},
        timeout=30,
    )
    assert direct.status_code == 200 and "said old-" not in direct.text
    gone = httpx.get(
        f"{node_api(platform, 'second')}/logs/apps/nosuchapp",
        headers={"authorization": f"Bearer {platform.token}"},
        timeout=30,
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_a_dead_node_costs_its_lines_and_says_so(fleet: tuple[Platform, Node]) -> None:
    platform, node = fleet
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    start = time.monotonic()
    r = platform.cli("logs", "logger", "--tail", "1000", timeout=60)
    assert time.monotonic() - start < 30
    first = {i for i, n in sources(platform).items() if n != "second"}
    assert any(i in r.stdout for i in first), r.stdout
    assert "node second did not answer: its logs are missing here" in r.stdout, r.stdout
    got = records(platform, "--tail", "1000")
    assert any(rec["source"] in first and rec["line"].startswith("said ") for rec in got)
    notice = [rec for rec in got if "node second" in rec["line"]]
    assert notice and notice[-1]["source"] == "osless" and notice[-1]["stream"] == "osless"


class HostileNode:
    """A node API that answers a tail with a 64 MiB line before a good record, and a follow with one
    record before holding the connection open; it notes when the API lets go of it."""

    HUGE = 64 * 1024 * 1024
    RECORD = json.dumps({"ts": 1.0, "source": "h-1", "stream": "stdout", "line": "from the hostile node"})

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.follows_open = 0
        self.follows_closed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = recv_until(conn, lambda b: b"\r\n\r\n" in b)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n"
            )
            if b"follow=true" not in head.split(b"\r\n")[0]:
                chunk = b"x" * (1024 * 1024)
                for _ in range(self.HUGE // len(chunk)):
                    conn.sendall(chunk)
                conn.sendall(b"\n" + self.RECORD.encode() + b"\n")
                return
            self.follows_open += 1
            conn.sendall(self.RECORD.encode() + b"\n")
            with contextlib.suppress(ConnectionResetError):  # a reset lets go as well as a close
                while conn.recv(4096):  # until the API closes its end
                    pass
            self.follows_closed += 1

    def close(self) -> None:
        self.server.close()


def peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_a_node_cannot_make_the_api_buffer_without_limit(own_platform: Platform) -> None:
    own_platform.deploy(APPS / "logger")
    hostile = HostileNode()
    try:
        r = own_platform.http("PUT", "/v1/nodes/hostile", json={"ttl_s": 300, "api": hostile.url})
        assert r.status_code == 200, r.text
        assert own_platform.proc is not None
        before = peak_rss_kb(own_platform.proc.pid)
        got = [
            json.loads(x)
            for x in own_platform.cli("logs", "logger", "--json", timeout=120).stdout.splitlines()
        ]
        # The 64 MiB line was skipped as it came, never held whole: the API's peak memory barely moved.
        assert peak_rss_kb(own_platform.proc.pid) - before < 24 * 1024
        assert any(rec["line"] == "from the hostile node" for rec in got), got
        assert any("node hostile sent a record longer than" in rec["line"] for rec in got), got
    finally:
        hostile.close()


def test_a_follow_lets_go_of_the_nodes_when_its_client_goes(own_platform: Platform) -> None:
    own_platform.deploy(APPS / "logger")
    hostile = HostileNode()
    try:
        own_platform.http("PUT", "/v1/nodes/hostile", json={"ttl_s": 300, "api": hostile.url})
        with httpx.stream(
            "GET",
            f"{own_platform.api}/v1/apps/logger/logs?follow=true&tail=0",
            headers={"authorization": f"Bearer {own_platform.token}"},
            timeout=30,
        ) as resp:
            # One iterator, held: a `for` over `resp.iter_lines()` left with `break` drops it, and
            # httpx then closes the connection at once, so the API would let go before the check.
            lines = resp.iter_lines()
            seen: list[str] = []
            while not any("from the hostile node" in line for line in seen):
                seen.append(next(lines))
            assert hostile.follows_open == 1 and hostile.follows_closed == 0, seen
        own_platform.wait_for(lambda: hostile.follows_closed == 1, timeout=10, what="the API to let go")
    finally:
        hostile.close()


class FloodingNode(HostileNode):
    """A node API that answers a tail with as many long records as it is asked for (at most LINES)."""

    LINES = 5000

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            recv_until(conn, lambda b: b"\r\n\r\n" in b)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n"
            )
            for k in range(self.LINES):
                rec = {
                    "ts": 1.0 + k / 1000,
                    "source": "h-1",
                    "stream": "stdout",
                    "line": f"{k} " + "x" * 16000,
                }
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(rec).encode() + b"\n")


def test_the_merged_tail_holds_a_bounded_amount_over_all_nodes(own_platform: Platform) -> None:
    own_platform.deploy(APPS / "logger")
    floods = [FloodingNode(), FloodingNode()]
    try:
        for k, flood in enumerate(floods):
            r = own_platform.http("PUT", f"/v1/nodes/flood{k}", json={"ttl_s": 300, "api": flood.url})
            assert r.status_code == 200, r.text
        assert own_platform.proc is not None
        before = peak_rss_kb(own_platform.proc.pid)
        kept, notices = 0, []
        with httpx.stream(
            "GET",
            f"{own_platform.api}/v1/apps/logger/logs?tail=100000",
            headers={"authorization": f"Bearer {own_platform.token}"},
            timeout=120,
        ) as resp:
            for line in resp.iter_lines():
                rec = json.loads(line)
                if rec["source"] == "osless":
                    notices.append(rec["line"])
                else:
                    kept += 1
        # 2 x 5000 records of 16 KB (160 MB) were asked for: the API held and sent about 32 MiB of
        # them, the newest, and said that the oldest were left out.
        assert peak_rss_kb(own_platform.proc.pid) - before < 96 * 1024
        assert 1000 < kept < 2 * FloodingNode.LINES, kept
        assert any("oldest of the lines asked for were left out" in n for n in notices), notices
    finally:
        for flood in floods:
            flood.close()


def test_join_refuses_a_node_api_port_out_of_range(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            OSLESS,
            "node",
            "join",
            "--api",
            "http://127.0.0.1:9",
            "--token",
            "osl_x",
            "--node-api-port",
            "70000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "--node-api-port must be a port from 0 to 65535" in r.stderr, r.stderr


def test_nodes_are_shown_a_reader_of_that_app_never_the_caller_s_token(own_platform: Platform) -> None:
    p = own_platform
    p.deploy(APPS / "logger")
    node = AuthRecorder()  # a node API answering no records
    try:
        assert p.http("PUT", "/v1/nodes/recorder", json={"ttl_s": 300, "api": node.url}).status_code == 200
        assert p.http("GET", "/v1/apps/logger/logs", params={"tail": 5}).status_code == 200
        assert node.shown, "the API did not ask the node"
        shown = node.shown[-1]
        assert p.token not in shown and shown.startswith("Bearer oslr_logger_"), shown
        reader = shown.split(" ", 1)[1]

        def as_reader(path: str) -> httpx.Response:
            return httpx.get(p.api + path, headers={"authorization": f"Bearer {reader}"}, timeout=30)

        me = as_reader("/v1/whoami").json()
        assert me["role"] == "reader" and me["app"] == "logger" and "logs" in me["permissions"]
        assert me["expires_at"] is not None and me["expires_at"] < time.time() + 400
        # It opens that app's logs on the node it was made for, and nothing at the API: not the logs
        # route (a node would renew it there, and read every node's lines), not tokens.
        assert as_reader("/v1/apps/logger/logs?tail=1").status_code == 403
        assert as_reader("/v1/tokens").status_code == 403
        assert as_reader("/v1/apps/other/logs?tail=1").status_code == 403
        # Forged or stretched: refused.
        app_, expires, mac = reader.removeprefix("oslr_").rsplit("_", 2)
        later = f"oslr_{app_}_{int(expires) + 3600}_{mac}"
        for bad in (later, f"oslr_other_{expires}_{mac}", reader[:-1] + ("0" if reader[-1] != "0" else "1")):
            r = httpx.get(p.api + "/v1/whoami", headers={"authorization": f"Bearer {bad}"}, timeout=30)
            assert r.status_code == 401, (bad, r.text)
    finally:
        node.close()
