"""Several gateway processes on one port: spread by the kernel, started again when killed, summed
in the traffic figures, gone with `osless up`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.platform import OSLESS, Platform, recv_until, running

APPS = Path(__file__).parent / "apps"
NOT_FOR_GATEWAYS = "osl_not_for_the_gateway_processes"


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A platform with two gateway processes, whatever the machine's cores; started with settings of
    the platform's own in its environment, which the gateway processes must not inherit."""
    p = Platform(
        tmp_path_factory.mktemp("gateways") / "data",
        args=["--gateways", "2"],
        up_env={"OSLESS_TOKEN": NOT_FOR_GATEWAYS},
    )
    p.start()
    try:
        p.wait_for(lambda: len(gateway_processes(p)) == 2, what="two gateway processes")
        yield p
    finally:
        p.stop()


def gateway_processes(platform: Platform) -> dict[str, int]:
    """name -> pid of the gateway processes `osless up` runs now."""
    assert platform.proc is not None
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == platform.proc.pid and b"osless.gateway" in argv and running(int(entry.name)):
            found[argv[argv.index(b"--name") + 1].decode()] = int(entry.name)
    return found


def answered_by(platform: Platform) -> str:
    """Which gateway process answers a new connection (the kernel picks one per connection)."""
    r = httpx.get(f"{platform.gateway}/_health", timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-osless-gateway"]


def _which(sock: socket.socket) -> str:
    sock.sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = recv_until(sock, lambda d: d.endswith(b'{"ok": true}'))
    found = re.search(rb"\r\nx-osless-gateway: ([^\r]+)\r\n", head)
    assert found, head
    return found.group(1).decode()


def test_connections_spread_over_the_processes_and_their_traffic_adds_up(gateways: Platform) -> None:
    gateways.deploy(APPS / "holder")
    gateways.cli("scale", "holder", "--min", "1")
    gateways.wait_for(
        lambda: any(i["status"]["phase"] == "ready" for i in gateways.instances("holder")),
        what="a ready instance",
    )
    # Connections until each process has three of them, each asked first which process it reached.
    held: dict[str, list[socket.socket]] = {name: [] for name in gateway_processes(gateways)}
    spare: list[socket.socket] = []
    try:
        for _ in range(100):
            if all(len(socks) == 3 for socks in held.values()):
                break
            sock = socket.create_connection(("127.0.0.1", gateways.http_port), timeout=30)
            socks = held[_which(sock)]
            (socks if len(socks) < 3 else spare).append(sock)
        assert all(len(socks) == 3 for socks in held.values()), {k: len(v) for k, v in held.items()}
        # Three requests in flight on each process for four seconds: only the sum of the two
        # processes' reports comes near six.
        started = time.monotonic()
        for socks in held.values():
            for sock in socks:
                sock.sendall(b"GET /holder/?s=4 HTTP/1.1\r\nHost: x\r\n\r\n")
        peak = 0.0
        while time.monotonic() - started < 3.8:
            figures = gateways.http("GET", "/v1/stats").json()["apps"].get("holder", {})
            peak = max(peak, figures.get("concurrency", 0.0))
            time.sleep(0.1)
        assert peak > 5, peak
        for socks in held.values():
            for sock in socks:
                answer = recv_until(sock, lambda d: d.endswith(b"held"))
                assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        for sock in [*spare, *(s for socks in held.values() for s in socks)]:
            sock.close()


def test_a_killed_gateway_process_starts_again_while_the_others_answer(gateways: Platform) -> None:
    before = gateway_processes(gateways)
    victim, pid = sorted(before.items())[0]
    os.kill(pid, signal.SIGKILL)
    gateways.wait_for(lambda: not running(pid), what="the killed process to end")
    answers: list[str] = []
    deadline = time.monotonic() + 30
    while victim not in answers and time.monotonic() < deadline:
        answers.append(answered_by(gateways))  # each on a new connection, every one answered
    assert victim in answers, f"{victim} never answered again: {gateway_processes(gateways)}"
    # Meanwhile the port kept answering: the other process took every connection.
    assert len(answers) > 5 and set(answers[:-1]) == set(before) - {victim}, answers
    assert gateway_processes(gateways)[victim] != pid
    assert f"GATEWAY PROCESS {victim} (pid {pid}) was killed by SIGKILL" in gateways.output()
    seen = {answered_by(gateways) for _ in range(40)}
    assert seen == set(before)


def test_the_token_is_not_on_a_gateway_processes_command_line_nor_in_its_environment(
    gateways: Platform,
) -> None:
    for pid in gateway_processes(gateways).values():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"osl_" not in argv, argv
        assert b"osl_" not in environ and b"OSLESS_" not in environ
    assert answered_by(gateways)  # and yet they serve: the token came another way


def test_gateway_processes_run_under_sched_batch(gateways: Platform) -> None:
    """A woken gateway waits its turn rather than preempting an instance (gateway/process.py)."""
    pids = gateway_processes(gateways).values()
    assert pids
    for pid in pids:
        assert os.sched_getscheduler(pid) == os.SCHED_BATCH, pid
    assert answered_by(gateways)


def test_a_second_platform_cannot_share_the_port(gateways: Platform, tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second `osless up` of the same user join the port's group and take
    half its connections: it is refused instead, as any listener there."""
    second = Platform(tmp_path / "data", http_port=gateways.http_port)
    try:
        with pytest.raises(RuntimeError, match=r"could not listen on 127\.0\.0\.1:"):
            second.start()
    finally:
        second.stop()
    assert answered_by(gateways)


def test_gateway_processes_die_with_osless_up(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "data", args=["--gateways", "2"]).start()
    try:
        platform.wait_for(lambda: len(gateway_processes(platform)) == 2, what="two gateway processes")
        pids = list(gateway_processes(platform).values())
    finally:
        platform.stop(signal.SIGKILL)
    for pid in pids:
        platform.wait_for(lambda pid=pid: not running(pid), timeout=5, what=f"gateway pid {pid} to end")


def test_gateways_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [OSLESS, "up", "--data-dir", str(tmp_path / "data"), "--gateways", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip() == "error: --gateways must be between 1 and 256 (one per core is the default), not 0"
    )
