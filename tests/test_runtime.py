"""osless.runtime: loader, inspect, the control protocol, and real zygotes forking real instances."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import unix_connect

from osless.runtime import protocol
from osless.runtime.loader import find_entry, load_app, web_kind
from osless.sdk import UsageError
from tests.platform import recv_until

APPS = Path(__file__).parent / "apps"
STARLETTE = APPS / "runtime_starlette"
FLASK = APPS / "runtime_flask"
FUNCTIONS = APPS / "runtime_functions"
BROKEN = APPS / "runtime_broken"


# --- harness -----------------------------------------------------------------------------------


class Instance:
    """A forked instance as the agent sees it: pid, its web and control sockets, and the read ends
    of its stdout/stderr."""

    def __init__(self, iid: str, pid: int, path: str, out: int, err: int) -> None:
        self.iid, self.pid, self.path, self.out, self.err = iid, pid, path, out, err
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://instance")
        self.control = httpx.Client(
            transport=httpx.HTTPTransport(uds=control_path(path)), base_url="http://instance"
        )
        self._read: dict[int, bytes] = {out: b"", err: b""}

    def invoke(self, function: str, event: Any = None, **headers: str) -> httpx.Response:
        return self.control.post(
            f"/invoke/{function}",
            content=json.dumps(event),
            headers={k.replace("_", "-"): v for k, v in headers.items()},
        )

    def wait_output(self, fd: int, text: str, timeout: float = 5.0) -> str:
        """Everything read from `fd` so far, once it contains `text`."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self._read[fd]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"{text!r} not in output: {self._read[fd]!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF before {text!r}: {self._read[fd]!r}")
            self._read[fd] += chunk
        return self._read[fd].decode()

    def close(self) -> None:
        self.client.close()
        self.control.close()
        for fd in (self.out, self.err):
            os.close(fd)


class Zygote:
    """Plays the node agent: starts a zygote on a SEQPACKET socketpair and talks the control protocol."""

    def __init__(self, code: Path, tmp: Path, entry: str = "app", deps: Path | None = None) -> None:
        self.tmp = tmp
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-s", "-m", "osless.runtime.zygote", "--code", str(code), "--entry", entry]
        cmd += ["--control-fd", str(theirs.fileno())]
        if deps is not None:
            cmd += ["--deps", str(deps)]
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        self.pending: list[dict[str, Any]] = []
        self.instances: list[Instance] = []

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first message matching `pred`; others are kept for later expects."""
        for msg in self.pending:
            if pred(msg):
                self.pending.remove(msg)
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise AssertionError(f"no matching message; got {self.pending}")
            msg, fds = protocol.recv(self.sock)
            assert msg is not None, f"zygote closed the channel; got {self.pending}"
            assert fds == []
            if pred(msg):
                return msg
            self.pending.append(msg)

    def fork(self, iid: str, env: dict[str, str] | None = None, path: str | None = None) -> Instance:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        path = path or str(self.tmp / f"{iid}.sock")
        sockets = bind_pair(path)
        fds = [out_w, err_w, *(s.fileno() for s in sockets)]
        protocol.send(self.sock, {"op": "fork", "id": iid, "env": env or {}}, fds)
        os.close(out_w)
        os.close(err_w)
        for s in sockets:
            s.close()
        forked = self.expect(lambda m: m.get("id") == iid)
        assert forked["op"] == "forked", forked
        assert self.expect(lambda m: m.get("id") == iid) == {"op": "ready", "id": iid}
        instance = Instance(iid, forked["pid"], path, out_r, err_r)
        self.instances.append(instance)
        return instance

    def exit_of(self, instance: Instance) -> dict[str, Any]:
        return self.expect(lambda m: m.get("op") == "exit" and m.get("id") == instance.iid)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for instance in self.instances:
            instance.close()


def control_path(path: str) -> str:
    return path + ".ctl"


def bind_pair(path: str) -> list[socket.socket]:
    """The web socket at `path` and the control socket beside it, bound as the node agent binds them."""
    pair = []
    for p in (path, control_path(path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(p)
        pair.append(sock)
    return pair


def _alive(pid: int) -> bool:
    # A zombie counts as dead: in a container nobody may reap an orphan.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def starlette(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Zygote, Instance, Instance]]:
    tmp = tmp_path_factory.mktemp("starlette")
    zygote = Zygote(STARLETTE, tmp)
    assert zygote.expect(lambda m: True) == {"op": "ready", "pid": zygote.proc.pid}
    # A socket file left by a dead instance on the same path must not stop the next one.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp / "two.sock"))
    stale.close()
    one = zygote.fork("one", env={"OSLESS_TEST_VAR": "first"})
    two = zygote.fork("two", env={"OSLESS_TEST_VAR": "second"})
    yield zygote, one, two
    zygote.close()


# --- instances of a Starlette (ASGI) app ------------------------------------------------------


def test_instances_serve_functions_web_and_health(starlette: tuple[Zygote, Instance, Instance]) -> None:
    _, one, two = starlette
    assert one.pid != two.pid
    for instance, var in ((one, "first"), (two, "second")):
        assert instance.control.get("/health").json() == {"ok": True, "config_version": 0}
        r = instance.invoke("greet", {"name": instance.iid}, x_osless_request_id=f"req-{instance.iid}")
        assert r.status_code == 200
        assert r.headers["x-osless-request-id"] == f"req-{instance.iid}"
        body = r.json()
        assert body["hello"] == instance.iid and body["request_id"] == f"req-{instance.iid}"
        assert (body["app"], body["fn"], body["pid"]) == ("runtime-starlette", "greet", instance.pid)
        assert 29_000 < body["remaining_ms"] <= 30_000
        assert instance.invoke("agreet", [1, 2]).json() == {"async": True, "event": [1, 2]}
        assert instance.invoke("env", "OSLESS_TEST_VAR").json() == var
        # The web app is served too, its lifespan having run in the instance, not the zygote.
        web = instance.client.get("/some/path").json()
        assert web == {
            "path": "/some/path",
            "pid": instance.pid,
            "lifespan_pid": instance.pid,
            "client": None,
            "scheme": "http",
            "root_path": "",
        }
        # What the gateway says of the request (only the gateway reaches the socket) is what the app sees.
        forwarded = {
            "x-forwarded-for": "10.1.2.3",
            "x-forwarded-proto": "https",
            "x-forwarded-prefix": "/app",
        }
        web = instance.client.get("/some/path", headers=forwarded).json()
        assert (web["client"], web["scheme"], web["root_path"]) == ("10.1.2.3", "https", "/app")
        assert web["path"] == "/app/some/path"  # whole, as the ASGI spec says: root_path its prefix
        with unix_connect(instance.path, "ws://instance/ws") as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "echo hi"


def test_an_instance_whose_egress_forwarder_is_not_listening_is_unhealthy(
    starlette: tuple[Zygote, Instance, Instance],
) -> None:
    zygote, _, _ = starlette
    with socket.socket() as s:  # a port nothing listens on: the forwarder is gone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cut_off = zygote.fork("no-egress", env={"HTTP_PROXY": f"http://127.0.0.1:{port}"})
    r = cut_off.control.get("/health")
    assert r.status_code == 503
    assert r.json()["problem"] == f"the egress forwarder is not listening on 127.0.0.1:{port}"
    with socket.create_server(("127.0.0.1", 0)) as listener:  # and once one listens, healthy again
        port = listener.getsockname()[1]
        back = zygote.fork("egress-back", env={"HTTP_PROXY": f"http://127.0.0.1:{port}"})
        assert back.control.get("/health").status_code == 200


def test_kept_alive_connections_live_while_used_and_close_when_idle(
    starlette: tuple[Zygote, Instance, Instance],
) -> None:
    _, one, _ = starlette

    def ask(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /kept HTTP/1.1\r\nHost: i\r\n\r\n")
        return recv_until(sock, lambda d: d.endswith(b"}"))

    busy, idle = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with busy, idle:
        busy.connect(one.path)
        idle.connect(one.path)
        assert ask(idle).startswith(b"HTTP/1.1 200")
        # uvicorn's keep-alive is 5 s: a connection that keeps asking lives on past it, one that
        # went quiet is closed once it has been quiet that long.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 7:
            assert b'"path":"/kept"' in ask(busy)
            time.sleep(1)
        idle.settimeout(5)
        assert idle.recv(1) == b""


def test_a_fast_stream_waits_for_a_slow_reader(starlette: tuple[Zygote, Instance, Instance]) -> None:
    _, _, two = starlette

    def produced() -> int:
        return int(two.client.get("/flooded").json()["chunks"])

    def settled(at_least: int, timeout: float = 10.0) -> int:
        """The count of chunks once it is `at_least` and has stopped growing for a while (the app
        is held back)."""
        deadline = time.monotonic() + timeout
        while (last := produced()) < at_least:
            assert time.monotonic() < deadline, f"the app produced {last} chunks, not {at_least}"
            time.sleep(0.02)
        since = time.monotonic()
        while time.monotonic() - since < 0.5:
            assert time.monotonic() < deadline, f"the app never stopped producing ({last} chunks)"
            time.sleep(0.02)
            if (now := produced()) != last:
                last, since = now, time.monotonic()
        return last

    with socket.socket(socket.AF_UNIX) as reader:  # asks for 64 MiB, then reads none of it
        reader.connect(two.path)
        reader.sendall(b"GET /flood HTTP/1.1\r\nHost: i\r\n\r\n")
        # The app starts, then flow control holds it back once the socket and a buffer's worth are
        # full: a few MiB made, not all 64 held in the instance's memory.
        held = settled(1)
        assert 1 <= held < 8, held
        # Reading lets it go on, by what was read, and it is held back again...
        got = 0
        while got < 16 << 20:
            chunk = reader.recv(1 << 20)
            assert chunk, "closed mid-stream"
            got += len(chunk)
        moved = settled(got >> 20)
        print(f"flow control: held at {held} chunks, at {moved} after reading {got >> 20} MiB")
        assert got >> 20 <= moved < (got >> 20) + 8, (held, moved, got)
        # ...and a reader that reads it all gets all of it.
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            chunk = reader.recv(1 << 20)
            assert chunk, "closed mid-stream"
            got += len(chunk)
            tail = (tail + chunk)[-16:]
    assert produced() == 64 and got > 64 << 20


def test_function_output_reaches_the_instance_pipes(starlette: tuple[Zygote, Instance, Instance]) -> None:
    _, one, two = starlette
    one.invoke("greet", {"name": "pipes-one"})
    two.invoke("greet", {"name": "pipes-two"})
    assert "greet stdout pipes-one" in one.wait_output(one.out, "greet stdout pipes-one")
    assert "greet stderr pipes-one" in one.wait_output(one.err, "greet stderr pipes-one")
    assert "pipes-two" not in one.wait_output(one.out, "pipes-one")
    two.wait_output(two.out, "greet stdout pipes-two")


def test_invoke_errors(starlette: tuple[Zygote, Instance, Instance]) -> None:
    _, one, _ = starlette
    r = one.invoke("boom")
    assert r.status_code == 500 and r.headers["x-osless-request-id"]
    error = r.json()["error"]
    assert (error["code"], error["message"]) == ("function_error", "ValueError: kaboom")
    assert error["traceback"].startswith("Traceback (most recent call last):\n")
    assert 'app.py", line' in error["traceback"] and "in boom" in error["traceback"]
    assert "osless/runtime" not in error["traceback"]  # the user's frames only
    assert "ValueError: kaboom" in one.wait_output(one.err, "in boom")

    # A TimeoutError of the function's own is its error, not the platform's deadline.
    r = one.invoke("own_timeout")
    assert r.status_code == 500 and r.json()["error"]["message"] == "TimeoutError: the database was slow"
    assert "in own_timeout" in r.json()["error"]["traceback"]

    hint = "which is not JSON-serialisable: return dict, list, str, int, float, bool or None"
    r = one.invoke("a_set")
    assert r.status_code == 500
    assert r.json() == {
        "error": {"code": "result_not_json", "message": f"function a_set returned a set, {hint}"}
    }
    r = one.invoke("nested_set")
    assert r.json()["error"]["message"] == f"function nested_set returned a dict containing a set, {hint}"

    r = one.invoke("nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_function"
    assert "has no function 'nope' (functions: a_set, aexit3, agreet," in r.json()["error"]["message"]

    r = one.control.post("/invoke/greet", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_event"
    assert one.control.post("/invoke/agreet").json() == {"async": True, "event": None}
    assert one.control.get("/invoke/greet").status_code == 405


def test_invoke_timeouts(starlette: tuple[Zygote, Instance, Instance]) -> None:
    _, one, two = starlette
    started = time.monotonic()
    slow = one.invoke("slow")
    aslow = two.invoke("aslow")
    assert time.monotonic() - started < 1.4  # answered at the 0.5 s deadline, not when the sleep ends
    assert slow.status_code == 504
    assert slow.json() == {
        "error": {"code": "timeout", "message": "function slow did not finish within 0.5s"}
    }
    assert aslow.json()["error"]["message"] == "function aslow did not finish within 0.5s"
    # The caller's deadline wins when it is sooner; a later one does not extend the function's timeout.
    r = one.invoke("greet", {"name": "x"}, x_osless_deadline=str(time.time() - 1))
    assert r.status_code == 504 and "the caller's deadline" in r.json()["error"]["message"]
    r = one.invoke("greet", {"name": "x"}, x_osless_deadline=str(time.time() + 3600))
    assert r.json()["remaining_ms"] <= 30_000
    r = one.invoke("greet", {"name": "x"}, x_osless_deadline=str(time.time() + 5))
    assert 3_000 < r.json()["remaining_ms"] <= 5_000


def test_instance_exits_are_reported(starlette: tuple[Zygote, Instance, Instance]) -> None:
    zygote, _, _ = starlette
    killed = zygote.fork("killed")
    os.kill(killed.pid, signal.SIGKILL)
    assert zygote.exit_of(killed) == {
        "op": "exit",
        "id": "killed",
        "pid": killed.pid,
        "code": None,
        "signal": 9,
    }

    for function in ("exit3", "aexit3"):
        exiting = zygote.fork(function)
        r = exiting.invoke(function)  # the caller still gets an answer before the instance goes
        assert r.status_code == 500
        assert r.json()["error"]["message"] == f"function {function} exited the instance with sys.exit(3)"
        assert zygote.exit_of(exiting)["code"] == 3

    hard = zygote.fork("hard")
    with pytest.raises(httpx.RemoteProtocolError):
        hard.invoke("hard_exit3")
    assert zygote.exit_of(hard) == {"op": "exit", "id": "hard", "pid": hard.pid, "code": 3, "signal": None}


def _wakes(pid: int) -> int:
    """How many times the process's threads have gone to sleep and been woken."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def test_an_idle_instance_wakes_once_a_second_yet_stops_at_once(
    starlette: tuple[Zygote, Instance, Instance],
) -> None:
    zygote, _, _ = starlette
    idle = zygote.fork("idle")
    assert idle.control.get("/health").status_code == 200
    time.sleep(0.5)
    before = _wakes(idle.pid)
    time.sleep(3)
    # Hundreds of idle instances share a node: uvicorn's own loop looks ten times a second.
    assert _wakes(idle.pid) - before <= 8
    start = time.monotonic()
    os.kill(idle.pid, signal.SIGTERM)
    assert zygote.exit_of(idle)["signal"] == signal.SIGTERM  # shut down, then the signal raised again
    assert time.monotonic() - start < 0.5


def test_bad_fork_requests_get_an_error(starlette: tuple[Zygote, Instance, Instance]) -> None:
    zygote, one, _ = starlette
    protocol.send(zygote.sock, {"op": "fork", "id": "nofds", "env": {}})
    error = zygote.expect(lambda m: m.get("id") == "nofds")
    assert error == {
        "op": "error",
        "id": "nofds",
        "error": "fork needs at least 4 fds (stdout, stderr, the web and control sockets, then "
        "cgroup.procs files), got 0",
    }
    protocol.send(zygote.sock, {"op": "launch", "id": "what"})
    assert zygote.expect(lambda m: m.get("id") == "what")["error"] == "unknown op 'launch'"
    assert one.control.get("/health").status_code == 200  # the zygote carries on


# --- other apps ------------------------------------------------------------------------------


def test_flask_app_through_wsgi(tmp_path: Path) -> None:
    zygote = Zygote(FLASK, tmp_path)
    try:
        assert zygote.expect(lambda m: True)["op"] == "ready"
        instance = zygote.fork("flask")
        assert instance.client.get("/hello").json() == {"hello": "flask", "method": "GET", "body": ""}
        r = instance.client.post("/hello", content=b"payload")
        assert r.json() == {"hello": "flask", "method": "POST", "body": "payload"}
        assert instance.client.get("/missing").status_code == 404  # Flask's own 404
        assert instance.invoke("add", {"a": 2, "b": 3}).json() == 5
    finally:
        zygote.close()


def test_functions_only_app_and_zygote_sigterm(tmp_path: Path) -> None:
    zygote = Zygote(FUNCTIONS, tmp_path)
    try:
        assert zygote.expect(lambda m: True)["op"] == "ready"
        instance = zygote.fork("fn")
        assert instance.invoke("ping").json() == "pong"
        r = instance.client.get("/")
        assert r.status_code == 404
        message = "app runtime-functions has no @app.web() handler"
        assert r.json() == {"error": {"code": "no_web_app", "message": message}}
        # SIGTERM to the zygote: instances are stopped (uvicorn drains, then dies of the signal) and reported.
        zygote.proc.send_signal(signal.SIGTERM)
        assert zygote.exit_of(instance)["signal"] == signal.SIGTERM
        assert zygote.proc.wait(5) == 0
    finally:
        zygote.close()


def test_closing_the_control_socket_ends_zygote_and_instances(tmp_path: Path) -> None:
    zygote = Zygote(FUNCTIONS, tmp_path)
    assert zygote.expect(lambda m: True)["op"] == "ready"
    pids = [zygote.fork(f"i{n}").pid for n in range(2)]
    zygote.sock.close()
    assert zygote.proc.wait(5) == 0
    for pid in pids:
        _wait_dead(pid)
    zygote.close()


def test_zygote_and_instances_die_with_the_agent(tmp_path: Path) -> None:
    # A stand-in agent starts a zygote and an instance, reports their pids, then is SIGKILLed.
    agent = tmp_path / "agent.py"
    agent.write_text(
        textwrap.dedent(
            f"""
            import os, socket, subprocess, sys, time
            from osless.runtime import protocol
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            cmd = [sys.executable, "-s", "-m", "osless.runtime.zygote", "--code", {str(FUNCTIONS)!r},
                   "--entry", "app", "--control-fd", str(theirs.fileno())]
            zygote = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
            assert protocol.recv(mine)[0]["op"] == "ready"
            web, control = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
            web.bind({str(tmp_path / "x.sock")!r})
            control.bind({str(tmp_path / "x.ctl")!r})
            fds = [1, 2, web.fileno(), control.fileno()]
            protocol.send(mine, {{"op": "fork", "id": "x", "env": {{}}}}, fds)
            forked = protocol.recv(mine)[0]
            assert protocol.recv(mine)[0]["op"] == "ready"
            print(zygote.pid, forked["pid"], flush=True)
            time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(agent)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    zygote_pid, instance_pid = map(int, proc.stdout.readline().split())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    _wait_dead(zygote_pid)
    _wait_dead(instance_pid)


def test_broken_app_reports_failed(tmp_path: Path) -> None:
    zygote = Zygote(BROKEN, tmp_path)
    msg = zygote.expect(lambda m: True)
    assert msg["op"] == "failed"
    assert msg["error"].startswith("Traceback (most recent call last):")
    assert "No module named 'osless_no_such_module'" in msg["error"]
    assert zygote.proc.wait(5) == 1
    zygote.close()


def test_fork_to_ready_is_fast(starlette: tuple[Zygote, Instance, Instance]) -> None:
    zygote, _, _ = starlette
    times = []
    for n in range(5):
        started = time.perf_counter()
        instance = zygote.fork(f"timed{n}")
        times.append(time.perf_counter() - started)
        os.kill(instance.pid, signal.SIGKILL)
        zygote.exit_of(instance)
    assert statistics.median(times) < 0.5, times  # a warm fork; a cold start would take most of a second


# --- inspect ---------------------------------------------------------------------------------


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-s", "-m", "osless.runtime.inspect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_inspect_prints_the_manifest() -> None:
    r = _inspect("--code", str(FLASK))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1  # one line, whatever the app prints while importing
    assert "importing the flask test app" in r.stderr
    assert json.loads(r.stdout) == {
        "entry": "app",
        "app": {
            "name": "runtime-flask",
            "functions": {"add": {"memory_mb": 128, "timeout_s": 5, "async": False}},
            "web": {
                "name": "web",
                "memory_mb": 256,
                "timeout_s": 20,
                "max_duration_s": 3600.0,
                "kind": "wsgi",
            },
            "volumes": {},
            "egress": [],
            "config": {},
        },
    }
    r = _inspect("--code", str(STARLETTE), "--entry", "app")
    manifest = json.loads(r.stdout)["app"]
    assert manifest["web"]["kind"] == "asgi"
    assert manifest["functions"]["agreet"]["async"] is True
    assert json.loads(_inspect("--code", str(FUNCTIONS)).stdout)["app"]["web"] is None


def test_inspect_fails_on_a_broken_app(tmp_path: Path) -> None:
    r = _inspect("--code", str(BROKEN))
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" in r.stderr and "osless_no_such_module" in r.stderr
    (tmp_path / "app.py").write_text(
        "import osless\napp = osless.App('x')\n@app.web()\ndef web():\n    return 42\n"
    )
    r = _inspect("--code", str(tmp_path))
    assert r.returncode == 1
    assert "UsageError: @app.web() factory must return an ASGI or WSGI app, got 42" in r.stderr


# --- loader ----------------------------------------------------------------------------------


@pytest.fixture
def isolated_imports() -> Iterator[None]:
    """load_app edits sys.path and imports modules; undo both so tests do not see each other's apps."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def test_find_entry(tmp_path: Path) -> None:
    assert find_entry(str(_write(tmp_path / "a", {"app.py": "", "main.py": ""}))) == "app"
    assert find_entry(str(_write(tmp_path / "m", {"main.py": ""}))) == "main"
    pyproject = '[project]\nname = "x"\n[tool.osless]\nentry = "shop.web"\n'
    assert find_entry(str(_write(tmp_path / "p", {"app.py": "", "pyproject.toml": pyproject}))) == "shop.web"
    assert find_entry(str(_write(tmp_path / "q", {"main.py": "", "pyproject.toml": "[project]\n"}))) == "main"
    with pytest.raises(UsageError, match=r"add app.py .* or set \[tool.osless\] entry"):
        find_entry(str(_write(tmp_path / "none", {"other.py": ""})))
    with pytest.raises(UsageError, match=r"not a file name: write 'app', not 'app\.py'"):
        find_entry(str(_write(tmp_path / "bad", {"pyproject.toml": '[tool.osless]\nentry = "app.py"\n'})))
    with pytest.raises(UsageError, match="must be a module name like"):
        find_entry(str(_write(tmp_path / "bad2", {"pyproject.toml": "[tool.osless]\nentry = 3\n"})))


def test_load_app(tmp_path: Path, isolated_imports: None) -> None:
    code = _write(
        tmp_path / "code",
        {
            "rt_entry_ok.py": """
                import osless, rt_helper
                app = osless.App("ok")
                alias = app  # one App under two names is still one App
                source = rt_helper.SOURCE
            """,
            "rt_helper.py": "SOURCE = 'code'\n",
        },
    )
    deps = _write(tmp_path / "deps", {"rt_helper.py": "SOURCE = 'deps'\n", "rt_deponly.py": "X = 1\n"})
    app = load_app(str(code), str(deps), "rt_entry_ok")
    assert app.name == "ok"
    assert sys.path[:2] == [str(code), str(deps)]
    assert sys.modules["rt_entry_ok"].source == "code"  # the code layer shadows the dependency layer
    __import__("rt_deponly")


def test_load_app_errors(tmp_path: Path, isolated_imports: None) -> None:
    code = _write(
        tmp_path,
        {
            "rt_none.py": "import osless\nname = 'no app here'\n",
            "rt_two.py": "import osless\nshop = osless.App('shop')\nadmin = osless.App('admin')\n",
            "rt_missing_dep.py": "import rt_not_installed\n",
        },
    )
    with pytest.raises(
        UsageError, match=r"module 'rt_none' \(.*rt_none.py\) defines no osless.App: add `app ="
    ):
        load_app(str(code), None, "rt_none")
    with pytest.raises(
        UsageError, match=r"defines 2 osless.App instances \(admin, shop\); an entry module has"
    ):
        load_app(str(code), None, "rt_two")
    with pytest.raises(UsageError, match="entry module 'rt_absent' not found in"):
        load_app(str(code), None, "rt_absent")
    with pytest.raises(ModuleNotFoundError, match="rt_not_installed"):  # the user's own import: as is
        load_app(str(code), None, "rt_missing_dep")


def test_web_kind() -> None:
    from flask import Flask
    from starlette.applications import Starlette

    async def asgi(scope: Any, receive: Any, send: Any) -> None: ...

    def wsgi(environ: Any, start_response: Any) -> list[bytes]:
        return []

    assert web_kind(asgi) == "asgi"
    assert web_kind(Starlette()) == "asgi"
    assert web_kind(wsgi) == "wsgi"
    assert web_kind(Flask("x")) == "wsgi"
    with pytest.raises(UsageError, match=r"must return an ASGI or WSGI app, got None$"):
        web_kind(None)
    with pytest.raises(UsageError, match="got the class Flask; return an instance"):
        web_kind(Flask)
    with pytest.raises(UsageError, match="got <function"):
        web_kind(lambda a, b, c: None)


# --- protocol --------------------------------------------------------------------------------


def test_protocol_round_trip_with_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        protocol.send(a, {"op": "fork", "n": 1}, [w])
        protocol.send(a, {"op": "second"})
        os.close(w)
        msg, fds = protocol.recv(b)
        assert msg == {"op": "fork", "n": 1} and len(fds) == 1
        os.write(fds[0], b"through the passed fd")
        os.close(fds[0])
        assert os.read(r, 100) == b"through the passed fd"
        assert protocol.recv(b) == ({"op": "second"}, [])  # packets stay apart
        with pytest.raises(protocol.ProtocolError, match="exceeds the 65536-byte packet limit"):
            protocol.send(a, {"big": "x" * protocol.MAX_PACKET})
        a.send(b"[1, 2]")
        with pytest.raises(protocol.ProtocolError, match="not an object"):
            protocol.recv(b)
        a.close()
        assert protocol.recv(b) == (None, [])
    os.close(r)
