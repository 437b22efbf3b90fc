"""`osless debug stack|profile`: py-spy on the node against a sandboxed instance, through the API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osless.node import debug
from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def debuggee(platform: Platform) -> Iterator[str]:
    platform.deploy_warm(APPS / "debuggee")
    platform.wait_for(
        lambda: [i for i in platform.instances("debuggee") if i["status"]["phase"] == "ready"],
        what="a running instance",
    )
    yield "debuggee"
    platform.http("DELETE", "/v1/apps/debuggee")


def _while(platform: Platform, function: str, seconds: float) -> threading.Thread:
    """A call of `function` running in the background (started, not yet in the app for a moment)."""
    t = threading.Thread(target=platform.invoke, args=("debuggee", function, seconds), daemon=True)
    t.start()
    return t


def _names(stacks: dict[str, Any]) -> set[str]:
    return {f["function"] for item in stacks["items"] for t in item["threads"] for f in t["frames"]}


def test_a_stack_names_the_function_where_a_request_sleeps(platform: Platform, debuggee: str) -> None:
    call = _while(platform, "sleep", 3)
    try:
        found = platform.wait_for(
            lambda: "sleepy_handler" in _names(s := platform.cli_json("debug", "stack", debuggee)) and s,
            timeout=10,
            what="sleepy_handler in a stack",
        )
    finally:
        call.join()
    (item,) = found["items"]
    assert item["instance"] == platform.instances(debuggee)[0]["id"]
    assert "osless.runtime.zygote" not in json.dumps(found)  # no command line: the platform's paths
    text = platform.cli("debug", "stack", debuggee, "--instance", item["instance"]).stdout
    assert f"instance {item['instance']}" in text and "Thread" in text


def _py_spy_on(pid: int) -> bool:
    """Whether a py-spy on this host is recording process `pid` now."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if b"record" in args and b"--pid" in args and str(pid).encode() in args:
            return True
    return False


def test_a_profile_names_the_busy_function(platform: Platform, debuggee: str, tmp_path: Path) -> None:
    pid = platform.instances(debuggee)[0]["status"]["pid"]  # the host's
    burn = _while(platform, "burn", 6)
    try:
        svg = tmp_path / "flame.svg"
        first = threading.Thread(
            target=platform.cli, args=("debug", "profile", debuggee, "--seconds", "2", "-o", str(svg))
        )
        first.start()
        # The CLI, the API and the node took it: py-spy samples the instance for 2 s from now on.
        platform.wait_for(lambda: _py_spy_on(pid), timeout=30, what="py-spy to sample the instance")
        again = platform.http("POST", f"/v1/apps/{debuggee}/debug/profile", params={"seconds": 1})
        first.join()
        r = platform.http(
            "POST", f"/v1/apps/{debuggee}/debug/profile", params={"seconds": 1, "format": "speedscope"}
        )
    finally:
        burn.join()
    assert again.status_code == 409 and again.json()["error"]["code"] == "profile_running", again.text
    assert svg.read_text().startswith("<?xml") and "busy_loop" in svg.read_text()
    assert "py-spy record" not in svg.read_text()  # its title named the node's paths and the host pid
    assert f"osless debug profile {debuggee} --instance" in svg.read_text()
    assert r.status_code == 200, r.text
    frames = r.json()["shared"]["frames"]
    assert any(f["name"] == "busy_loop" for f in frames)


def test_debug_is_refused_clearly_and_audited(platform: Platform, debuggee: str) -> None:
    reader = platform.cli_json("tokens", "create", "--role", "read", "--name", "debug-reader")["token"]
    r = platform.http(
        "POST", f"/v1/apps/{debuggee}/debug/stack", headers={"authorization": f"Bearer {reader}"}
    )
    assert r.status_code == 403 and "'debug' permission" in r.json()["error"]["message"]
    debugger = platform.cli_json("tokens", "create", "--role", "debug", "--name", "debugger-person")["token"]
    r = platform.http(
        "POST", f"/v1/apps/{debuggee}/debug/stack", headers={"authorization": f"Bearer {debugger}"}
    )
    assert r.status_code == 200, r.text
    assert platform.http("POST", "/v1/apps/nosuchapp/debug/stack").status_code == 404
    r = platform.http("POST", f"/v1/apps/{debuggee}/debug/stack", params={"instance": "nosuch"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "instance_not_found"
    r = platform.http("POST", f"/v1/apps/{debuggee}/debug/profile", params={"seconds": 61})
    assert r.status_code == 422 and "seconds" in r.text
    cli = platform.cli("debug", "profile", "nosuchapp", check=False)
    assert cli.returncode == 1 and "nosuchapp" in cli.stderr
    entries = platform.http("GET", "/v1/audit", params={"app": debuggee}).json()["items"]
    seen = {(e["name"], e["path"].split("?")[0], e["status"]) for e in entries}
    assert ("debug-reader", f"/v1/apps/{debuggee}/debug/stack", 403) in seen
    assert ("debugger-person", f"/v1/apps/{debuggee}/debug/stack", 200) in seen
    assert any(e["path"].endswith("instance=nosuch") and e["status"] == 404 for e in entries)


def test_a_node_refuses_a_debug_call_not_from_the_api(platform: Platform, debuggee: str) -> None:
    """The node API takes only a `debugger` token the API made for it: a person's admin token, shown
    to the node directly, would skip the API's audit."""
    import httpx

    (inst,) = platform.instances(debuggee)
    nodes = platform.http("GET", "/v1/nodes").json()["items"]
    node_api = next(n["api"] for n in nodes if n["name"] == inst["node"])
    r = httpx.post(
        f"{node_api}/debug/apps/{debuggee}/instances/{inst['id']}/stack",
        headers={"authorization": f"Bearer {platform.token}"},
    )
    assert r.status_code == 403 and "sample" in r.json()["error"]["message"]
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    attach = "ws" + node_api.removeprefix("http") + f"/debug/apps/{debuggee}/instances/{inst['id']}/attach"
    with pytest.raises(InvalidStatus) as refused:
        connect(attach, additional_headers={"authorization": f"Bearer {platform.token}"}).close()
    assert refused.value.response.status_code == 403


def test_a_py_spy_past_its_time_is_stopped(tmp_path: Path) -> None:
    """What py-spy reads is the app's memory: a run that does not end in time is killed, not waited for."""
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        args = ["record", "--pid", str(target.pid), "--duration", "30", "--nonblocking"]
        started = time.monotonic()
        with pytest.raises(debug.Failed, match="no answer within 1s"):
            asyncio.run(debug._run([*args, "--output", str(tmp_path / "p.svg")], timeout=1))
        assert time.monotonic() - started < 10
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        names = [Path(f"/proc/{c}/comm").read_text().strip() for c in children]
        assert "py-spy" not in names  # killed and reaped, not left behind
    finally:
        target.kill()
        target.wait()


def _attach(platform: Platform, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [platform.osless, "debug", "attach", "debuggee", "--port", "0", "--json", *args],
        env={**platform.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line_of(text: str, marker: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if marker in line)


def test_a_dap_client_attached_through_the_api_stops_at_a_breakpoint_hit_by_a_request(
    platform: Platform, debuggee: str
) -> None:
    import httpx

    from tests.dap import Dap

    where = httpx.get(
        f"{platform.gateway}/{debuggee}/where", timeout=30
    ).text  # app.py as the sandbox sees it
    line = _line_of((APPS / "debuggee" / "app.py").read_text(), "the attach test's breakpoint")
    cli = _attach(platform, "--keep-in-rotation", "--timeout", "2m")
    try:
        assert cli.stdout is not None
        ready = json.loads(cli.stdout.readline() or "null")
        assert ready, cli.stderr.read() if cli.stderr else ""
        (inst,) = platform.instances(debuggee)
        assert ready["instance"] == inst["id"]
        dap = Dap("127.0.0.1", ready["port"])
        dap.request("initialize", clientID="osless-test", adapterID="debugpy", pathFormat="path")
        attached = dap.send("attach", justMyCode=False)
        dap.event("initialized")
        bps = dap.request("setBreakpoints", source={"path": where}, breakpoints=[{"line": line}])
        assert bps["body"]["breakpoints"][0]["verified"], bps
        dap.request("configurationDone")
        assert dap.response(attached)["success"]
        answers: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(httpx.get(f"{platform.gateway}/{debuggee}/hi", timeout=60))
        )
        request.start()
        stopped = dap.event("stopped")["body"]
        assert stopped["reason"] == "breakpoint"
        frames = dap.request("stackTrace", threadId=stopped["threadId"])["body"]["stackFrames"]
        assert (frames[0]["name"], frames[0]["line"], frames[0]["source"]["path"]) == (
            "hello_handler",
            line,
            where,
        )
        # Held past the node API's 10 s for a request's head (which cut its websockets) and past
        # a health check or two, which a stopped loop would fail.
        time.sleep(11)
        assert not answers  # held at the breakpoint
        logs = platform.cli("logs", debuggee, "--instance", inst["id"], "--tail", "50").stdout
        assert "a debugger is attached" in logs and "health check failed" not in logs, logs
        dap.request("continue", threadId=stopped["threadId"])
        request.join(30)
        assert answers and answers[0].status_code == 200 and answers[0].text == "hello debugger"
        dap.request("disconnect")
        dap.close()
        assert cli.wait(30) == 0
    finally:
        cli.kill()
        cli.communicate()
    entries = platform.http("GET", "/v1/audit", params={"app": debuggee}).json()["items"]
    said = [(e["method"], e["path"]) for e in entries if e["method"] in ("ATTACH", "DETACH")]
    assert any(m == "ATTACH" and inst["id"] in p and "rotation kept" in p for m, p in said), said
    assert any(m == "DETACH" and inst["id"] in p for m, p in said), said
    # A debugged instance does not serve again: a fresh one takes its place.
    platform.wait_for(
        lambda: (
            [i for i in platform.instances(debuggee) if i["status"]["phase"] == "ready"]
            and platform.instances(debuggee)[0]["status"]["pid"] != inst["status"]["pid"]
        ),
        what="the instance replaced",
    )


def test_attach_needs_debug_leaves_the_rotation_and_is_audited(platform: Platform, debuggee: str) -> None:
    reader = platform.cli_json("tokens", "create", "--role", "read", "--name", "attach-reader")["token"]
    refused = _attach(platform, env={"OSLESS_TOKEN": reader})
    out, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1 and "'debug' permission" in json.loads(out)["error"]["message"], out
    platform.wait_for(
        lambda: [i for i in platform.instances(debuggee) if i["status"]["phase"] == "ready"], what="ready"
    )

    def phases() -> dict[str, str]:
        return {i["id"]: i["status"]["phase"] for i in platform.instances(debuggee)}

    cli = _attach(platform, "--timeout", "4s")
    try:
        assert cli.stdout is not None
        ready = json.loads(cli.stdout.readline() or "null")
        assert ready
        held = ready["instance"]
        # Another local user at the port first: refused (debugpy would run its code as the app).
        hello = '{"seq":1,"type":"request","command":"initialize","arguments":{"adapterID":"debugpy"}}'
        stranger = subprocess.run(
            [
                "bash",
                "-c",
                f"exec 3<>/dev/tcp/127.0.0.1/{ready['port']} && printf 'Content-Length: %d\\r\\n\\r\\n%s' "
                f"{len(hello)} '{hello}' >&3 && timeout 3 head -c 16 <&3",
            ],
            user=65534,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert stranger.stdout == "", stranger  # closed unanswered: debugpy never saw it
        # Out of the rotation, and another instance placed to serve in its stead.
        platform.wait_for(
            lambda: (
                (p := phases()).get(held) == "debugging"
                and next((i for i, ph in p.items() if i != held and ph == "ready"), None)
            ),
            what="out of rotation, and a stand-in ready",
        )
        import httpx

        r = httpx.get(f"{platform.gateway}/{debuggee}/hi", timeout=30)
        assert r.status_code == 200 and r.text == "hello debugger"  # served, by the stand-in
        out, err = cli.communicate(timeout=30)  # no debugger came: the session ends at its time
    finally:
        cli.kill()
        cli.communicate()
    assert cli.returncode == 0 and "time (4s) is up" in json.loads(out)["ended"], (out, err)
    assert "refused a connection from uid 65534" in err, err
    # The held one replaced and back in rotation; the app back to its one instance.
    platform.wait_for(lambda: list(phases().values()) == ["ready"], what="back to one ready instance")
    entries = platform.http("GET", "/v1/audit", params={"app": debuggee}).json()["items"]
    seen = [(e["name"], e["method"], e["status"], e["path"]) for e in entries]
    assert any(n == "attach-reader" and m == "ATTACH" and s == 403 for n, m, s, _ in seen), seen
    assert any(m == "ATTACH" and s == 101 and "rotation left" in p for _, m, s, p in seen), seen
    assert any(m == "DETACH" and "rotation left" in p for _, m, s, p in seen), seen


def test_a_debug_shell_has_the_app_imported(platform: Platform, debuggee: str) -> None:
    out = platform.cli("debug", "shell", debuggee, input="print(app_thing, app.name)\n")
    assert "the debuggee's thing debuggee" in out.stdout, out


def test_attach_says_a_taken_port_and_a_bad_timeout(platform: Platform) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        r = platform.cli("debug", "attach", "debuggee", "--port", port, check=False)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    r = platform.cli("debug", "attach", "debuggee", "--timeout", "5h", check=False)
    assert r.returncode == 1 and "at most 4h" in r.stderr
