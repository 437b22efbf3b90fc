"""One-off commands (`osless run`, `WS /v1/apps/{app}/runs`) and release steps (`App(release=[...])`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shlex
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osless.api.secrets import SecretBox, load_key
from tests.platform import Platform, copy_app

APPS = Path(__file__).parent / "apps"


def _run(
    platform: Platform, *args: str, input: str = "", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`osless run ...`, its stdin a pipe (empty unless given): never the terminal pytest may run in."""
    return platform.cli("run", *args, input=input, check=check)


@pytest.fixture(scope="module")
def oneoff(platform: Platform) -> Iterator[dict[str, Any]]:
    deployed = platform.deploy(APPS / "oneoff")
    platform.cli("config", "set", "oneoff", "greeting=bonjour", "password=s3cret")
    yield deployed
    platform.http("DELETE", "/v1/apps/oneoff")


def test_run_streams_output_and_exits_with_the_commands_code(
    platform: Platform, oneoff: dict[str, Any]
) -> None:
    r = _run(platform, "oneoff", "--", "python", "-c", "import sys; print('hi'); sys.exit(3)", check=False)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout == "hi\n"
    # Audited: who ran what, in which app and release.
    entries = platform.http("GET", "/v1/audit", params={"app": "oneoff"}).json()["items"]
    ran = next(e for e in entries if e["method"] == "RUN")
    assert ran["name"] == "admin" and ran["role"] == "admin"
    command = ["python", "-c", "import sys; print('hi'); sys.exit(3)"]
    assert ran["path"] == f"/v1/apps/oneoff/runs v{oneoff['release']}: {shlex.join(command)}"


def test_run_forwards_stdin_and_keeps_stderr_apart(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = _run(platform, "oneoff", "--", "python", "tools.py", "echo", input="yes\n")
    assert r.stdout == "got yes\n"
    assert r.stderr == "to stderr\n"


def test_run_sees_the_apps_config_and_secrets(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = _run(platform, "oneoff", "--", "python", "tools.py", "settings")
    assert r.stdout.split() == ["bonjour", "s3cret", "oneoff", str(oneoff["release"])]


def test_run_is_sandboxed_as_the_app(platform: Platform, oneoff: dict[str, Any]) -> None:
    data = platform.data_dir
    assert (data / "admin-token").exists()
    r = _run(platform, "oneoff", "--", "python", "tools.py", "who", str(data), "/etc")
    seen = json.loads(r.stdout)
    uid = platform.http("GET", "/v1/apps/oneoff").json()["uid"]
    assert seen["uid_map"] == ["0", str(uid), "1"]  # root inside is the app's uid outside, nobody else
    # The platform's data dir is hidden: only the paths down to the image's layers and the runtime
    # layer (read-only) show.
    assert sorted(seen["seen"][str(data)]) == ["node", "runtime"]
    assert "shadow" not in seen["seen"]["/etc"] and "passwd" in seen["seen"]["/etc"]  # its own /etc


def test_a_volume_written_by_a_run_is_read_by_the_apps_instance(
    platform: Platform, oneoff: dict[str, Any]
) -> None:
    _run(platform, "oneoff", "--", "python", "tools.py", "write", "from a run")
    assert platform.invoke("oneoff", "note") == (200, {"note": "from a run"})


def _refused(platform: Platform, path: str, token: str) -> tuple[int, dict[str, Any]]:
    """The status and error body of a run the API refuses before its websocket opens."""
    return _refused_at(platform.api.replace("http", "ws", 1) + path, token)


def _refused_at(url: str, token: str) -> tuple[int, dict[str, Any]]:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as e:
        connect(url, additional_headers={"authorization": f"Bearer {token}"}).close()
    return e.value.response.status_code, json.loads(e.value.response.body or b"")["error"]


def test_run_is_refused_clearly(platform: Platform, oneoff: dict[str, Any]) -> None:
    reader = platform.cli_json("tokens", "create", "--role", "read", "--name", "runs-reader")["token"]
    status, error = _refused(platform, "/v1/apps/oneoff/runs", reader)
    assert (status, error["code"]) == (403, "forbidden") and "'deploy' permission" in error["message"]
    r = _run(platform, "oneoff", "--", "true", check=False)
    assert r.returncode == 0
    r = _run(platform, "nosuchapp", "--", "true", check=False)
    assert r.returncode == 1 and "nosuchapp" in r.stderr
    assert _refused(platform, "/v1/apps/nosuchapp/runs", platform.token)[0] == 404
    assert platform.http("POST", "/v1/apps", json={"name": "unreleased"}).status_code == 201
    try:
        status, error = _refused(platform, "/v1/apps/unreleased/runs", platform.token)
        assert (status, error["code"]) == (409, "no_release")
        r = _run(platform, "unreleased", "--json", "--", "true", check=False)
        assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "no_release"
    finally:
        platform.http("DELETE", "/v1/apps/unreleased")
    status, error = _refused(platform, "/v1/apps/oneoff/runs?release=99", platform.token)
    assert (status, error["code"]) == (404, "release_not_found")
    assert _refused(platform, "/v1/apps/oneoff/runs?release=x", platform.token)[0] == 400
    assert _refused(platform, "/v1/apps/oneoff/runs?timeout=0", platform.token)[0] == 400
    r = _run(platform, "oneoff", "--release", "1", "--", "sh", "-c", 'echo "v$OSLESS_RELEASE"')
    assert r.stdout == "v1\n"


def test_run_json_captures_the_output_and_the_code(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = _run(platform, "oneoff", "--json", "--", "python", "tools.py", "echo", input="json\n", check=False)
    assert r.returncode == 0
    assert json.loads(r.stdout) == {
        "exit_code": 0,
        "stdout": "got json\n",
        "stderr": "to stderr\n",
        "truncated": False,
    }


def test_run_ends_at_its_timeout(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = _run(
        platform,
        "oneoff",
        "--timeout",
        "1s",
        "--",
        "python",
        "-c",
        "import time; time.sleep(60)",
        check=False,
    )
    assert r.returncode == 124
    assert "timeout" in r.stderr


def _with_release(tmp_path: Path, name: str, release: list[str]) -> Path:
    """tests/apps/oneoff with these release steps."""
    src = copy_app(APPS / "oneoff", tmp_path / name)
    code = (src / "app.py").read_text()
    (src / "app.py").write_text(code.replace('"oneoff-data"}', f'"oneoff-data"}}, release={release!r}'))
    return src


def _log(platform: Platform, deploy_id: str) -> str:
    r = platform.http("GET", f"/v1/deploys/{deploy_id}/log")
    return "\n".join(str(json.loads(line).get("line", "")) for line in r.text.splitlines())


def test_release_steps_run_before_the_release_takes_traffic(platform: Platform, tmp_path: Path) -> None:
    try:
        # Shell command lines, as build steps: `&&` and quotes as a shell reads them.
        steps = ["python tools.py write 'before traffic'", "true && python -c \"print('second step')\""]
        deployed = platform.deploy(_with_release(tmp_path, "v1", steps), "--name", "stepped")
        assert deployed["status"] == "succeeded"
        # The release's first request reads what its release step wrote in the app's volume.
        assert platform.invoke("stepped", "note") == (200, {"note": "before traffic"})
        log = _log(platform, deployed["id"])
        assert "==> Release step: python tools.py write 'before traffic'" in log
        assert log.index("wrote before traffic") < log.index("second step") < log.index("==> Released")

        failing = ["python tools.py write 'not released'", "python -c 'import sys; sys.exit(3)'"]
        r = platform.cli(
            "deploy", str(_with_release(tmp_path, "v2", failing)), "--name", "stepped", check=False
        )
        assert r.returncode == 1
        assert "release step `python -c 'import sys; sys.exit(3)'` exited with code 3" in r.stdout + r.stderr
        app = platform.http("GET", "/v1/apps/stepped").json()
        assert (app["current_release"], app["latest_release"]) == (1, 1)
        # The old release still answers (the first step of the failed one did write its volume).
        assert platform.invoke("stepped", "note") == (200, {"note": "not released"})
        assert platform.http("GET", "/v1/apps/stepped/releases").json()["items"][-1]["version"] == 1
    finally:
        platform.http("DELETE", "/v1/apps/stepped")


def test_runs_of_an_app_at_once_are_bounded(platform: Platform, oneoff: dict[str, Any]) -> None:
    from websockets.sync.client import connect

    url = platform.api.replace("http", "ws", 1) + "/v1/apps/oneoff/runs"
    auth = {"authorization": f"Bearer {platform.token}"}
    waiting = ["python", "-c", "print('up', flush=True); input()"]
    with contextlib.ExitStack() as runs:  # each command ends with its socket, closed on the way out
        for _ in range(4):
            ws = runs.enter_context(connect(url, additional_headers=auth))
            ws.send(json.dumps({"op": "start", "command": waiting}))
            assert ws.recv(timeout=30).startswith(b"\x01up")  # running on the node
        status, error = _refused(platform, "/v1/apps/oneoff/runs", platform.token)
        assert (status, error["code"]) == (429, "too_many_runs")
    # Their records went with them: the app may run again.
    platform.wait_for(lambda: _run(platform, "oneoff", "--", "true", check=False).returncode == 0)


def test_run_has_an_instances_memory_limit(platform: Platform, oneoff: dict[str, Any]) -> None:
    grow = "b = bytearray(400 * 1024 * 1024); print('survived')"  # the app's instances get 256 MB
    r = _run(platform, "oneoff", "--", "python", "-c", grow, check=False)
    assert r.returncode == 137 and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)


def _read_until(fd: int, wanted: bytes, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came: {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the CLI closed its terminal
                assert wanted in seen, f"{wanted!r} never came: {bytes(seen)!r}"


def _at_a_terminal(platform: Platform, *command: str) -> tuple[subprocess.Popen[bytes], int]:
    """`osless run oneoff -- COMMAND` with a terminal of 30x100 as its stdin, stdout and stderr."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    cli = subprocess.Popen(
        [platform.osless, "run", "oneoff", "--", *command],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=platform.env,
        start_new_session=True,
    )
    os.close(slave)
    return cli, master


def test_run_at_a_terminal_gives_the_command_one(platform: Platform, oneoff: dict[str, Any]) -> None:
    ask = (
        "import os; print(os.isatty(0), os.isatty(2), os.get_terminal_size()); "
        "print('hello', input('name? '))"
    )
    cli, master = _at_a_terminal(platform, "python", "-c", ask)
    try:
        seen = bytearray()
        _read_until(master, b"name? ", seen)
        assert b"True True os.terminal_size(columns=100, lines=30)" in seen
        os.write(master, b"Ada\r")  # the local terminal is raw: Enter is a carriage return
        _read_until(master, b"hello Ada", seen)
        assert cli.wait(30) == 0
    finally:
        cli.kill()
        os.close(master)
    # Ctrl-C at the terminal interrupts the command there (SIGINT), as at a local terminal.
    cli, master = _at_a_terminal(platform, "python", "-c", "import time; print('ready'); time.sleep(60)")
    try:
        _read_until(master, b"ready", bytearray())
        os.write(master, b"\x03")
        assert cli.wait(30) == 130
    finally:
        cli.kill()
        os.close(master)


def test_a_node_runs_a_command_only_for_the_api(platform: Platform, oneoff: dict[str, Any]) -> None:
    node = platform.http("GET", "/v1/nodes").json()["items"][0]
    url = node["api"].replace("http", "ws", 1) + "/runs/oneoff"
    box = SecretBox(load_key(platform.data_dir))
    for token, said in [
        (platform.token, "only as the API asks"),  # even an admin's: it would skip the API's audit
        (box.scoped_token("runner", "oneoff", 60, "elsewhere"), "made for another node"),
        (box.scoped_token("runner", "other", 60, node["name"]), "limited to app 'other'"),
    ]:
        status, error = _refused_at(url, token)
        assert status == 403 and said in error["message"], (status, error)
