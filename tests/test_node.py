"""The node agent: instances are supervised, restarted with the reason recorded, and their output kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.platform import OSLESS, Platform, ns_pids

APPS = Path(__file__).parent / "apps"


def ready(platform: Platform, app: str) -> list[dict[str, object]]:
    return [i for i in platform.instances(app) if i["status"]["phase"] == "ready"]


def test_crashing_instance_is_restarted_and_ps_says_why(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy")
    before = ready(platform, "crashy")[0]
    r = platform.cli("invoke", "crashy.crash", check=False)
    assert r.returncode == 1 and "failed before answering" in r.stderr

    def restarted() -> dict[str, object] | None:
        for i in ready(platform, "crashy"):
            if i["status"]["restarts"] >= 1:  # type: ignore[index, operator]
                return i
        return None

    inst = platform.wait_for(restarted, what="the instance to come back")
    assert inst["id"] == before["id"] and inst["status"]["pid"] != before["status"]["pid"]
    assert inst["status"]["last_exit"]["reason"] == "exited with code 3"
    table = platform.cli("ps", "crashy").stdout
    assert "exited with code 3" in table
    # ps shows the host's pid; inside its pid namespace the instance sees another number for itself
    inner = json.loads(platform.cli("invoke", "crashy.ok").stdout)["pid"]
    assert ns_pids(inst["status"]["pid"]) == [inst["status"]["pid"], inner]

    os.kill(inst["status"]["pid"], signal.SIGKILL)
    platform.wait_for(
        lambda: any(
            i["status"].get("last_exit", {}).get("reason") == "killed by SIGKILL"
            and i["status"]["phase"] == "ready"
            for i in platform.instances("crashy")
        ),
        what="restart after SIGKILL",
    )
    assert "killed by SIGKILL" in platform.cli("ps", "crashy").stdout
    logs = platform.cli("logs", "crashy").stdout
    assert "about to exit with code 3" in logs
    assert "exited with code 3" in logs


def test_function_output_reaches_logs_and_follow(platform: Platform, hello: dict[str, object]) -> None:
    out = json.loads(platform.cli("invoke", "hello.greet", '{"name": "Logan"}').stdout)
    records = platform.wait_for(
        lambda: [
            r
            for r in map(json.loads, platform.cli("logs", "hello", "--json").stdout.splitlines())
            if out["request_id"] in r["line"]
        ],
        what="the log line",
    )
    assert records[0]["stream"] == "stdout" and records[0]["source"].startswith("hello-v")


def test_scale_changes_the_number_of_instances(platform: Platform, hello: dict[str, object]) -> None:
    platform.cli("scale", "hello", "--min", "3", "--max", "5")
    platform.wait_for(lambda: len(ready(platform, "hello")) == 3, what="3 ready instances")
    pids = {i["status"]["pid"] for i in ready(platform, "hello")}
    assert len(pids) == 3
    platform.cli("scale", "hello", "--min", "1", "--max", "5")
    platform.wait_for(lambda: len(platform.instances("hello")) == 1, what="back to 1 instance")


def test_memory_hog_is_oom_killed_and_reported(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy", "--name", "hog")
    r = platform.cli("invoke", "hog.hog", check=False)
    assert r.returncode == 1
    platform.wait_for(
        lambda: any(
            (i["status"].get("last_exit") or {}).get("reason", "").startswith("out of memory")
            for i in platform.instances("hog")
        ),
        what="the OOM kill to be reported",
    )
    assert "out of memory" in platform.cli("ps", "hog").stdout


def test_result_that_is_not_json_is_a_clear_error(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy", "--name", "badresult")
    r = platform.cli("invoke", "badresult.bad_result", check=False)
    assert r.returncode == 1
    assert "not JSON-serialisable" in r.stderr and "set" in r.stderr


def test_logs_follow_streams_new_lines(platform: Platform, hello: dict[str, object]) -> None:
    follower = subprocess.Popen(
        [OSLESS, "logs", "hello", "-f", "--tail", "0", "--json"],
        env=platform.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            seen.append(json.loads(line)["line"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # invoke until the follower, which attaches asynchronously, has seen one of our lines
        def seen_one() -> bool:
            rid = json.loads(platform.cli("invoke", "hello.greet", '{"name": "Fol"}').stdout)["request_id"]
            time.sleep(0.3)
            return any(rid in line for line in seen)

        platform.wait_for(seen_one, timeout=20, what="a followed log line")
    finally:
        follower.terminate()
        follower.wait(10)
        reader.join(5)
        assert follower.stdout is not None
        follower.stdout.close()


def test_ctx_log_reaches_osless_logs(platform: Platform, inspector: dict[str, object]) -> None:
    status, request_id = platform.invoke("inspector", "log", "hello")
    assert status == 200
    expected = f"ctx.log says hello (request {request_id})"

    def records() -> list[dict[str, str]]:
        out = platform.cli("logs", "inspector", "--json", "--tail", "200").stdout
        return [r for r in map(json.loads, out.splitlines()) if request_id in r["line"]]

    found = platform.wait_for(records, what="the ctx.log line in osless logs")
    # A `logging` record, with its level, logger and request (its debug line is below INFO).
    assert [(r["line"], r["stream"], r["level"], r["logger"], r["request"]) for r in found] == [
        (expected, "log", "INFO", "osless.app.inspector.log", request_id)
    ]
    assert found[0]["source"].startswith("inspector-v")
    assert f"{request_id} INFO {expected}" in platform.cli("logs", "inspector").stdout


def test_osless_nodes_lists_each_node_with_what_it_says_of_itself(platform: Platform) -> None:
    [node] = platform.wait_for(
        lambda: [n for n in platform.cli_json("nodes") if n.get("pid")] or None, what="a node's report"
    )
    assert node["ready"] is True and node["address"] == "127.0.0.1"
    assert node["gateway"] == platform.gateway
    assert platform.proc is not None and node["pid"] == platform.proc.pid  # one process: `osless up`
    assert 0 < node["memory_free_mb"] <= node["memory_total_mb"]
    assert node["instances"] >= node["instances_ready"] >= 0
    table = platform.cli("nodes").stdout
    assert node["name"] in table and platform.gateway in table and "yes" in table


def test_a_stuck_zygote_holds_up_no_other_apps_config(platform: Platform) -> None:
    """A config push waits up to 10 s for a zygote's answer: that wait is its own app's alone."""
    for app in ("cfg-stuck", "cfg-free"):
        platform.deploy_warm(APPS / "configured", "--name", app)
        platform.wait_for(lambda app=app: ready(platform, app), what=f"an instance of {app}")
    pid = int(ready(platform, "cfg-stuck")[0]["status"]["pid"])  # type: ignore[index, call-overload]
    zygote = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    def greeting(app: str) -> str:
        status, body = platform.invoke(app, "read")
        assert status == 200, body
        return str(body["greeting"])

    os.kill(zygote, signal.SIGSTOP)  # it reads nothing more, and answers nothing
    try:
        r = platform.http("PATCH", "/v1/apps/cfg-stuck/config", json={"set": {"greeting": "later"}})
        assert r.status_code == 200, r.text
        start = time.monotonic()
        r = platform.http("PATCH", "/v1/apps/cfg-free/config", json={"set": {"greeting": "now"}})
        assert r.status_code == 200, r.text
        platform.wait_for(lambda: greeting("cfg-free") == "now", what="the other app's change")
        assert time.monotonic() - start < 5, "the other app's push waited for the stuck zygote"
    finally:
        os.kill(zygote, signal.SIGCONT)
    # Once it reads again, the change it was sent reaches its instance: nothing was lost.
    platform.wait_for(lambda: greeting("cfg-stuck") == "later", what="the stuck app's change")
    for app in ("cfg-stuck", "cfg-free"):
        assert platform.http("DELETE", f"/v1/apps/{app}").status_code == 204
