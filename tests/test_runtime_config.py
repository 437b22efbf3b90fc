"""Live config: a release zygote applies each `config` message and forwards it to its instances."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from osless.runtime import protocol
from tests.test_runtime import APPS, Instance, Zygote

CONFIG_LIVE = APPS / "config_live"


class ConfigZygote(Zygote):
    """The test_runtime harness, with the zygote's initial config on its command line."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-s", "-m", "osless.runtime.zygote", "--code", str(CONFIG_LIVE)]
        cmd += ["--entry", "app", "--control-fd", str(theirs.fileno())]
        if config is not None:
            cmd += ["--config", json.dumps(config)]
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        self.pending: list[dict[str, Any]] = []
        self.instances: list[Instance] = []
        assert self.expect(lambda m: True) == {"op": "ready", "pid": self.proc.pid}

    def configure(self, values: dict[str, Any], version: int) -> dict[str, Any]:
        protocol.send(self.sock, {"op": "config", "values": values, "version": version})
        return self.expect(lambda m: m.get("op") in ("configured", "error"))


def _health_version(instance: Instance) -> int:
    body = instance.control.get("/health").json()
    assert body["ok"] is True
    return int(body["config_version"])


def _wait_version(instances: list[Instance], version: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for instance in instances:
        while _health_version(instance) != version:
            assert time.monotonic() < deadline, f"{instance.iid} never reached config version {version}"
            time.sleep(0.001)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[ConfigZygote]:
    zygote = ConfigZygote(tmp_path, {"values": {"n": 1, "token": "s3cret"}, "version": 1})
    yield zygote
    zygote.close()


def test_a_change_reaches_every_instance_without_a_restart(live: ConfigZygote) -> None:
    instances = [live.fork(f"i{n}") for n in range(3)]
    pids = [i.pid for i in instances]
    for instance in instances:
        assert _health_version(instance) == 1
        # Inherited from the zygote at the fork, not applied by the instance itself: no time.
        assert "config_applied_at" not in instance.control.get("/health").json()
        assert instance.invoke("read").json() == {
            "greeting": "hi",
            "n": 1,
            "token": "s3cret",
            "pid": instance.pid,
        }
        shown = instance.invoke("shown").json()
        # The zygote applied the config before importing the app: module-level reads saw it.
        assert shown["at_import"] == {"greeting": "hi", "n": 1, "token": "s3cret"}
        assert shown["repr"] == "Settings(greeting='hi', n=1, token='***')"
        assert shown["as_dict"]["token"] == "s3cret"

    started = time.perf_counter()
    sent_at = time.time()
    values = {"greeting": "hello", "n": 1, "token": "s3cret", "not_in_schema": True}
    assert live.configure(values, 2) == {"op": "configured", "version": 2, "instances": 3}
    replied = time.perf_counter() - started
    _wait_version(instances, 2)
    everywhere = time.perf_counter() - started
    for instance in instances:  # when each instance applied v2, for a reader that comes later
        applied_at = instance.control.get("/health").json()["config_applied_at"]
        assert sent_at <= applied_at <= time.time()
    print(
        f"config push: configured after {replied * 1e3:.2f} ms, all 3 at v2 after {everywhere * 1e3:.2f} ms"
    )
    assert everywhere < 1.0

    for instance in instances:
        assert instance.invoke("read").json()["greeting"] == "hello"
        # Hooks got exactly the changed keys (not the unknown one); sync and async alike.
        assert instance.invoke("seen").json() == {
            "sync": [{"greeting": "hello"}],
            "async": [{"greeting": "hello"}],
        }
        # A failing hook is reported with its traceback and does not stop the instance or the other hooks.
        err = instance.wait_output(instance.err, "async hook failure")
        assert "on_config_change hook broken failed:" in err and "RuntimeError: sync hook failure" in err
        assert "on_config_change hook abroken failed:" in err and "Traceback (most recent call last)" in err
        assert "s3cret" not in err
    assert [i.pid for i in instances] == pids  # no restart

    # A rotated secret and an unset key (back to its default) are changes like any other.
    assert live.configure({"n": 2, "token": "rotated"}, 3)["instances"] == 3
    _wait_version(instances, 3)
    for instance in instances:
        assert instance.invoke("read").json()["token"] == "rotated"
        assert instance.invoke("seen").json()["sync"] == [
            {"greeting": "hello"},
            {"greeting": "hi", "n": 2, "token": "rotated"},
        ]

    # A new instance starts with the current values, and gets the next change too.
    fourth = live.fork("i3")
    assert _health_version(fourth) == 3
    assert fourth.invoke("read").json() == {"greeting": "hi", "n": 2, "token": "rotated", "pid": fourth.pid}
    assert fourth.invoke("seen").json() == {"sync": [], "async": []}  # the zygote runs no hooks
    assert live.configure({"n": 4, "token": "rotated"}, 4) == {
        "op": "configured",
        "version": 4,
        "instances": 4,
    }
    _wait_version([*instances, fourth], 4)
    assert fourth.invoke("seen").json()["sync"] == [{"n": 4}]

    # Once an instance is reaped its channel is gone.
    os.kill(instances[0].pid, signal.SIGKILL)
    live.exit_of(instances[0])
    assert live.configure({"n": 5, "token": "rotated"}, 5)["instances"] == 3
    _wait_version([*instances[1:], fourth], 5)


def test_required_key_not_set(tmp_path: Path) -> None:
    zygote = ConfigZygote(tmp_path)
    try:
        instance = zygote.fork("bare")
        assert _health_version(instance) == 0
        r = instance.invoke("read")
        assert r.status_code == 500
        assert (
            r.json()["error"]["message"]
            == "ConfigError: n is not set: run osless config set config-live n=..."
        )
        assert zygote.configure({"n": 7, "token": "t"}, 1)["instances"] == 1
        _wait_version([instance], 1)
        assert instance.invoke("read").json()["n"] == 7
    finally:
        zygote.close()


def test_bad_config_messages_get_an_error(live: ConfigZygote) -> None:
    instance = live.fork("one")
    assert live.configure([], 2)["error"] == "config values must be an object of key names to values"  # type: ignore[arg-type]
    assert live.configure({}, -1)["error"] == "config version must be an integer >= 0"
    # Within the limit as sent (raw UTF-8), over it once re-encoded for the instances: refused whole.
    wide = {"op": "config", "values": {"n": "é" * 30_000}, "version": 2}
    live.sock.send(json.dumps(wide, ensure_ascii=False).encode())
    error = live.expect(lambda m: m.get("op") == "error")["error"]
    assert error == "config of 180045 bytes exceeds the 65536-byte packet limit"
    assert _health_version(instance) == 1  # nothing was applied
    assert instance.invoke("read").json()["n"] == 1


def test_a_busy_instance_gets_the_latest_values_once_it_reads(live: ConfigZygote) -> None:
    busy, idle = live.fork("busy"), live.fork("idle")
    os.kill(busy.pid, signal.SIGSTOP)
    version = 1
    delivered: list[int] = []
    try:
        # Big messages fill the stopped instance's queue (however large the host's socket buffers); the
        # zygote must neither block nor give up on it. Then a few more, which it only remembers.
        while delivered.count(1) < 3:
            assert version < 1000, "the stopped instance's queue never filled"
            version += 1
            delivered.append(
                live.configure({"n": version, "token": "t", "greeting": "x" * 60_000}, version)["instances"]
            )
        # On a loaded host the idle instance's queue may fill for a moment too (0): never a block.
        assert delivered[0] == 2 and set(delivered) <= {0, 1, 2}, delivered
    finally:
        os.kill(busy.pid, signal.SIGCONT)
    _wait_version([busy, idle], version)
    assert busy.invoke("read").json()["n"] == version
    # The backlog was applied as a few changes (what was queued, then the latest), not one per message.
    seen = busy.invoke("seen").json()["sync"]
    assert len(seen) <= 5 and seen[-1]["n"] == version, [change["n"] for change in seen]


def test_spawn_applies_config_before_the_import(tmp_path: Path) -> None:
    """The agent's path: the root zygote spawns a release zygote with the config in the request."""
    agent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = [
        sys.executable,
        "-s",
        "-m",
        "osless.runtime.zygote",
        "--root",
        "--control-fd",
        str(theirs.fileno()),
    ]
    root = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
    theirs.close()
    # The release zygote's control socket and log pipes, as the agent makes them.
    mine, control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    release = Zygote.__new__(Zygote)  # the harness around a zygote that the root started
    release.tmp, release.pending, release.instances, release.proc = tmp_path, [], [], root
    release.sock = mine
    try:
        assert protocol.recv(agent)[0] == {"op": "ready", "pid": root.pid}
        request = {
            "op": "spawn",
            "id": "s",
            "code": str(CONFIG_LIVE),
            "deps": None,
            "entry": "app",
            "sandbox": None,
        }
        fds = [control.fileno(), out_w, err_w]
        protocol.send(agent, {**request, "config": {"values": {"n": "x"}, "version": "one"}}, fds)
        assert protocol.recv(agent)[0] == {
            "op": "error",
            "id": "s",
            "error": "bad spawn config: config version must be an integer >= 0",
        }
        protocol.send(agent, {**request, "config": {"values": {"n": 3, "token": "t"}, "version": 9}}, fds)
        spawned, _ = protocol.recv(agent)
        assert spawned is not None and spawned["op"] == "spawned", spawned
        assert release.expect(lambda m: True)["op"] == "ready"
        instance = release.fork("spawned")
        assert _health_version(instance) == 9
        assert instance.invoke("shown").json()["at_import"] == {"greeting": "hi", "n": 3, "token": "t"}
    finally:
        control.close()
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        agent.close()
        release.close()  # closes `mine`, waits for the root (which ends its release zygote with it)
