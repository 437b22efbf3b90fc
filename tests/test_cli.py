"""The CLI against the running platform: `apps delete`, `restart`, and errors under --json."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.platform import EXAMPLES, OSLESS, Platform, free_port, running


@pytest.fixture(scope="module")
def rolling(platform: Platform) -> Iterator[dict[str, Any]]:
    """examples/hello as `rolling`, with two instances ready; deleted after (the platform is shared)."""
    deployed = platform.deploy(EXAMPLES / "hello", "--name", "rolling")
    platform.cli("scale", "rolling", "--min", "2")
    platform.wait_for(lambda: len(_ready(platform, "rolling")) == 2, what="2 ready instances")
    yield deployed
    platform.http("DELETE", "/v1/apps/rolling")


def _ready(platform: Platform, app: str) -> list[dict[str, Any]]:
    return [i for i in platform.instances(app) if i["status"]["phase"] == "ready"]


def test_restart_replaces_every_instance_while_the_app_keeps_serving(
    platform: Platform, rolling: dict[str, Any]
) -> None:
    before = _ready(platform, "rolling")
    releases = platform.http("GET", "/v1/apps/rolling/releases").json()["items"]
    answers: list[int | str] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    answers.append(http.get(f"{platform.gateway}/rolling/").status_code)
                except httpx.HTTPError as e:
                    answers.append(repr(e))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        spec = platform.cli_json("restart", "rolling")
    finally:
        stop.set()
        asker.join()
    assert spec["name"] == "rolling" and spec["current_release"] == rolling["release"]
    # When restart returns, every instance is a new one, of the same release, and ready.
    after = platform.instances("rolling")
    assert len(after) == 2 and all(i["status"]["phase"] == "ready" for i in after), after
    assert not {i["id"] for i in after} & {i["id"] for i in before}
    assert {i["release"] for i in after} == {rolling["release"]}
    assert all(i["restart"] == spec["restart"] for i in after)
    # A restart is no release: the history is as it was.
    assert platform.http("GET", "/v1/apps/rolling/releases").json()["items"] == releases
    # Rolling: the app answered every request meanwhile.
    assert answers and set(answers) == {200}, answers
    for pid in (i["status"]["pid"] for i in before):
        platform.wait_for(lambda pid=pid: not running(pid), what=f"old instance pid {pid} to end")


def test_restart_no_wait_returns_at_once_and_the_rollout_goes_on(
    platform: Platform, rolling: dict[str, Any]
) -> None:
    before = {i["id"] for i in platform.instances("rolling")}
    spec = platform.cli_json("restart", "rolling", "--no-wait")
    platform.wait_for(
        lambda: (
            {i["id"] for i in _ready(platform, "rolling")}.isdisjoint(before)
            and len(_ready(platform, "rolling")) == 2
            and all(i["restart"] == spec["restart"] for i in platform.instances("rolling"))
        ),
        what="the instances to be replaced",
    )


def test_restart_of_an_app_never_released_is_refused(platform: Platform) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "unreleased"}).status_code == 201
    r = platform.cli("restart", "unreleased", "--json", check=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "no_release"
    platform.http("DELETE", "/v1/apps/unreleased")


def _in_a_terminal(platform: Platform, *args: str, answer: str) -> tuple[int, str]:
    """Run the CLI with a terminal as its stdin (as a person would), answering its question."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [platform.osless, *args],
            env=platform.env,
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(leader, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return proc.returncode, out + err


def test_apps_delete_asks_first(platform: Platform) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "asked"}).status_code == 201
    code, said = _in_a_terminal(platform, "apps", "delete", "asked", answer="n")
    assert code == 1 and "Delete app asked and all its releases, config" in said and "volumes" in said, said
    assert platform.http("GET", "/v1/apps/asked").status_code == 200
    code, said = _in_a_terminal(platform, "apps", "delete", "asked", answer="y")
    assert code == 0 and "deleted app asked" in said, said
    assert platform.http("GET", "/v1/apps/asked").status_code == 404


def test_apps_delete_without_a_terminal_needs_yes(platform: Platform) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "scripted"}).status_code == 201
    r = platform.cli("apps", "delete", "scripted", input="y\n", check=False)
    assert r.returncode == 1 and "--yes" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert platform.http("GET", "/v1/apps/scripted").status_code == 200
    assert platform.cli_json("apps", "delete", "scripted", "--yes") == {"app": "scripted", "deleted": True}
    assert platform.http("GET", "/v1/apps/scripted").status_code == 404
    r = platform.cli("apps", "delete", "scripted", "--yes", "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "app_not_found"


def test_errors_under_json_are_one_json_object_on_stdout(platform: Platform, hello: dict[str, Any]) -> None:
    for args, code in [
        (["apps", "show", "nowhere"], "app_not_found"),
        (["invoke", "hello.nowhere", "{}"], "unknown_function"),
        (["invoke", "hello.greet", "{oops"], "invalid_event"),
        (["config", "get", "nowhere"], "app_not_found"),
    ]:
        r = platform.cli(*args, "--json", check=False)
        assert r.returncode == 1, (args, r)
        error = json.loads(r.stdout)["error"]
        assert error["code"] == code and error["message"], (args, error)
        assert r.stderr == "", (args, r.stderr)
        # Without --json: one red line on stderr, nothing on stdout.
        r = platform.cli(*args, check=False)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("error: "), (args, r)


def test_a_command_line_refused_under_json_is_a_json_error(platform: Platform) -> None:
    for args in (["scale", "hello", "--min", "many"], ["restart"]):
        r = platform.cli(*args, "--json", check=False)
        assert r.returncode == 2 and r.stderr == "", (args, r)
        assert json.loads(r.stdout)["error"]["code"] == "invalid_usage", (args, r.stdout)
    r = platform.cli("scale", "hello", "--min", "many", check=False)
    assert r.returncode == 2 and r.stdout == "" and "not a valid integer" in r.stderr, r


def test_invoke_takes_json(platform: Platform, hello: dict[str, Any]) -> None:
    out = platform.cli_json("invoke", "hello.greet", '{"name": "Ada"}')
    assert out["message"] == "Hello, Ada!"


def test_help_lists_every_command_and_a_command_runs_alone() -> None:
    # A run builds only the command it names (cli/main.py `_only`): the help and the errors must not notice.
    code = (
        "from osless.cli.main import app; print(*[c.name or c.callback.__name__.replace('_', '-')"
        " for c in app.registered_commands], *[g.name for g in app.registered_groups])"
    )
    names = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([OSLESS, "--help"], env=env, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(names), out
    out = subprocess.run([OSLESS, "tokens", "--help"], env=env, capture_output=True, text=True, check=True)
    assert {"create", "ls", "revoke"} <= set(out.stdout.split()), out.stdout
    r = subprocess.run([OSLESS, "nowhere"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "No such command 'nowhere'" in r.stderr, r


def test_an_api_that_does_not_answer_is_one_line_naming_it() -> None:
    for api, says in [
        (f"http://127.0.0.1:{free_port()}", "cannot reach the API at http://127.0.0.1:"),
        ("127.0.0.1:7070", "is not an http:// or https:// URL"),
    ]:
        env = {**os.environ, "OSLESS_API": api, "OSLESS_TOKEN": "x"}
        r = subprocess.run([OSLESS, "status"], env=env, capture_output=True, text=True)
        assert r.returncode == 1 and r.stdout == "", r
        assert r.stderr.startswith("error: ") and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
