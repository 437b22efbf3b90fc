"""A hostile app, kept here, tries to get out; the host and a second app must not notice.

Every check asserts the specific error the kernel or the platform gives, not just a failure.
"""

from __future__ import annotations

import errno
import json
import re
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.node.agent import run_dir_for
from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A platform of this module's own: the CPU test measures latency, so no other test's apps run."""
    p = Platform(tmp_path_factory.mktemp("sandbox") / "data").start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def apps(platform: Platform) -> dict[str, Any]:
    platform.deploy_warm(APPS / "victim")
    platform.deploy_warm(APPS / "hostile")
    return {"victim": platform.instances("victim")[0], "hostile": platform.instances("hostile")[0]}


def call(platform: Platform, fn: str, event: Any = None) -> Any:
    status, body = platform.invoke("hostile", fn, event)
    assert status == 200, body
    return body


def test_the_app_sees_only_its_own_sandbox(platform: Platform, apps: dict[str, Any]) -> None:
    me = call(platform, "whoami")
    assert me["uid"] == 0 and me["hostname"] == "hostile"
    inside, outside, count = me["uid_map"]
    assert (inside, count) == ("0", "1") and int(outside) >= 100_000  # root inside is nobody outside
    assert me["interfaces"] == ["lo"]
    assert len(me["pids"]) <= 4 and 1 in me["pids"]  # its own pid namespace: zygote, instance, forwarder
    assert platform.proc is not None and platform.proc.pid not in me["pids"]
    assert me["cap_eff"] == me["cap_bnd"] == "0000000000000000"
    assert me["no_new_privs"] == "1" and me["seccomp"] == "2"
    assert me["proxy"] == "http://127.0.0.1:3128"


def test_host_files_and_other_apps_are_out_of_view(platform: Platform, apps: dict[str, Any]) -> None:
    victim_code = platform.invoke("victim", "where")[1]["code"]
    platform.invoke("victim", "put", {"text": "secret"})
    for path in (
        "/etc/shadow",
        str(platform.data_dir / "state.db"),
        str(platform.data_dir / "admin-token"),
        victim_code + "/app.py",
        str(platform.data_dir / "volumes" / "victim" / "victim-data"),
        str(Path(__file__).resolve().parent.parent / "README.md"),
        "/root/.bash_history",
    ):
        assert call(platform, "read", {"path": path}) == {
            "error": "FileNotFoundError",
            "errno": errno.ENOENT,
        }, path
    passwd = call(platform, "read", {"path": "/etc/passwd"})["ok"]
    assert passwd.startswith("root:x:0:0:app:") and "daemon" not in passwd


def test_code_and_runtime_are_read_only(platform: Platform, apps: dict[str, Any]) -> None:
    # The layer as the node pulled it into its image cache, by its archive's sha256.
    manifest = platform.http("GET", "/v1/apps/hostile").json()["release"]["manifest"]
    layer = str(
        platform.data_dir / "node" / "images" / "layers" / manifest["layer_archives"]["code"]["sha256"]
    )
    assert call(platform, "read", {"path": layer + "/app.py"})["ok"].startswith('"""An app that tries')
    denied = {"error": "PermissionError", "errno": errno.EACCES}  # owned by a uid that does not exist inside
    read_only = {"error": "OSError", "errno": errno.EROFS}
    expected = {
        layer + "/app.py": denied,
        "/etc/passwd": denied,
        layer + "/new.py": read_only,
        "/usr/lib/osless-was-here": read_only,
        "/owned": read_only,
    }
    for path, error in expected.items():
        assert call(platform, "write", {"path": path}) == error, path
    # and beneath the permissions, the mounts themselves are read-only, except /tmp
    flags = call(platform, "readonly", {"paths": [layer, "/usr", "/", "/etc", "/tmp"]})
    assert flags == {layer: True, "/usr": True, "/": True, "/etc": True, "/tmp": False}
    assert call(platform, "write", {"path": "/tmp/scratch"}) == {"ok": "written"}


def test_no_direct_network_and_no_platform_sockets(platform: Platform, apps: dict[str, Any]) -> None:
    refused = {"error": "ConnectionRefusedError", "errno": errno.ECONNREFUSED}
    assert call(platform, "connect", {"host": "127.0.0.1", "port": platform.api_port}) == refused
    assert call(platform, "connect", {"host": "127.0.0.1", "port": platform.http_port}) == refused
    unreachable = call(platform, "connect", {"host": "1.1.1.1", "port": 80})
    assert unreachable == {"error": "OSError", "errno": errno.ENETUNREACH}
    victim_socket = platform.instances("victim")[0]["status"]["socket"]
    assert call(platform, "connect", {"unix": victim_socket}) == {
        "error": "FileNotFoundError",
        "errno": errno.ENOENT,
    }


def test_egress_goes_through_the_proxy_and_only_where_allowed(
    platform: Platform, apps: dict[str, Any]
) -> None:
    api = f"http://127.0.0.1:{platform.api_port}/v1/status"
    direct = call(platform, "fetch", {"url": api})
    assert direct["error"] == "URLError" and "Connection refused" in direct["message"]
    proxied = call(platform, "fetch", {"url": api, "via_proxy": True})
    assert proxied["status"] == 403 and "not allowed for app hostile" in proxied["body"]
    outside = call(platform, "fetch", {"url": "http://example.com/"})
    assert outside["status"] == 403
    assert 'declare it with App("hostile", egress=["example.com"])' in outside["body"]
    # other osless apps, by name, through the platform
    assert call(platform, "fetch", {"url": "http://victim.osless/"}) == {"status": 200, "body": "fine"}
    logs = platform.cli("logs", "hostile", "--tail", "50").stdout
    assert "egress to example.com:80 refused" in logs


def _concrete(path: str, app: str) -> str:
    """An OpenAPI path with its parameters filled in, for `app`."""
    values = {"app": app, "function": "whoami", "version": "1", "node": "x", "name": "x"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), path)


def test_the_authorization_matrix_of_an_app_token(platform: Platform, apps: dict[str, Any]) -> None:
    """Every operation of the API, with no token, a forged one, and the hostile app's own token:
    the app's token opens its own config, schema and endpoints (GET), and nothing else."""
    token = call(platform, "token")
    assert token.startswith("osla_hostile_")
    own = {
        "/v1/whoami",
        "/v1/apps/hostile/config",
        "/v1/apps/hostile/config/schema",
        "/v1/apps/hostile/endpoints",
    }
    forged = {
        "forged app token": f"osla_victim_{'0' * 40}",
        "another app's token as the app's": token.replace("osla_hostile_", "osla_victim_"),
        "no scheme": token,
    }
    spec = platform.http("GET", "/openapi.json").json()
    checked = 0
    with httpx.Client(base_url=platform.api, timeout=30) as client:
        for path, operations in spec["paths"].items():
            if not path.startswith("/v1/"):
                continue
            for method in operations:
                for app in ("hostile", "victim"):
                    url = _concrete(path, app)
                    # Refused either way: 401, or 429 once this address has failed too often.
                    r = client.request(method, url)
                    assert r.status_code in (401, 429), (method, url, r.status_code)
                    for what, bad in forged.items():
                        header = bad if what == "no scheme" else f"Bearer {bad}"
                        r = client.request(method, url, headers={"authorization": header})
                        assert r.status_code in (401, 429), (what, method, url, r.status_code)
                    r = client.request(method, url, headers={"authorization": f"Bearer {token}"})
                    while r.status_code == 429:  # the token's own rate (more routes than its burst)
                        time.sleep(float(r.headers.get("retry-after", "1")))
                        r = client.request(method, url, headers={"authorization": f"Bearer {token}"})
                    if method == "get" and url in own:
                        assert r.status_code == 200, (method, url, r.text)
                    else:
                        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (
                            method,
                            url,
                        )
                    checked += 1
    assert checked > 60, checked


def test_egress_never_reaches_this_node_however_the_app_spells_it(
    platform: Platform, apps: dict[str, Any]
) -> None:
    """An app that lists loopback, "any" and link-local addresses in a dozen spellings as its own
    egress gets none of them, by name or by CONNECT, at the API's port or the gateway's."""
    r = platform.cli("deploy", str(APPS / "hostile_egress"), "--json", check=False)
    if r.returncode != 0:  # refusing such a list outright protects as well
        said = r.stdout + r.stderr  # under --json, the error is on stdout
        assert "egress" in said and "127.0.0.1" in said, said
        return
    listed = platform.http("GET", "/v1/apps/hostile-egress").json()["release"]["manifest"]["egress"]
    assert "127.0.0.1" in listed and "0x7f000001" in listed  # as declared: the list is the app's
    spellings = [*listed, "localhost.", "[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]", "[::]"]
    status, out = platform.invoke(
        "hostile-egress", "probe", {"hosts": spellings, "ports": [platform.api_port, platform.http_port]}
    )
    assert status == 200, out
    assert len(out) == len(spellings) * 2 * 2
    for what, (code, body) in out.items():
        assert code == 403, (what, code, body)
        assert "osless egress" in body and '"gateway"' not in body, (what, body)


def test_escape_system_calls_are_denied(platform: Platform, apps: dict[str, Any]) -> None:
    out = call(platform, "escape")
    for name in ("mount", "unshare_user", "unshare_mount", "setns", "ptrace", "sethostname"):
        assert out[name] == {"errno": errno.EPERM}, name
    assert out["chroot"] == {"error": "PermissionError", "errno": errno.EPERM}
    assert out["setuid"] == {"error": "OSError", "errno": errno.EINVAL}  # no uid but root exists inside


def test_fork_bomb_stops_at_the_pids_limit(platform: Platform, apps: dict[str, Any]) -> None:
    out = call(platform, "forkbomb")
    assert out["error"] == "BlockingIOError" and out["errno"] == errno.EAGAIN
    assert 90 <= out["forked"] < 128  # the instance's pids.max, less what was already running
    assert httpx.get(f"{platform.gateway}/victim/").text == "fine"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_log_flood_is_capped_and_the_platform_keeps_serving(
    platform: Platform, apps: dict[str, Any]
) -> None:
    assert platform.proc is not None
    up = platform.proc.pid
    rss_before = _rss_kb(up)
    slowest = 0.0
    flooding = threading.Event()

    def watch() -> None:  # the gateway, the API and the agent share one loop: it must not stall
        nonlocal slowest
        while flooding.is_set():
            t0 = time.monotonic()
            assert httpx.get(f"{platform.gateway}/victim/", timeout=30).text == "fine"
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.05)

    # 64 MiB in lines of 1 KiB, then 64 MiB in one line that never ends
    for event in ({"mb": 64, "line": 1024}, {"mb": 64, "line": 0}):
        flooding.set()
        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.monotonic()
        try:
            assert platform.invoke("hostile", "flood", event, timeout=120) == (200, 64 << 20)
        finally:
            flooding.clear()
            watcher.join()
        took = time.monotonic() - t0
        assert took < 30, (event, took)
    assert slowest < 3.0, slowest
    assert _rss_kb(up) < rss_before + 50 * 1024  # nothing of it is held in memory

    def flood_done() -> list[dict[str, Any]]:
        out = platform.cli("logs", "hostile", "--json", "--tail", "20").stdout
        return [r for r in map(json.loads, out.splitlines()) if r["line"] == "flood done"]

    platform.wait_for(flood_done, what="the end of the flood in the logs")
    records = [
        json.loads(x) for x in platform.cli("logs", "hostile", "--json", "--tail", "1000").stdout.splitlines()
    ]
    endless = [r["line"] for r in records if r["line"].startswith("y")]
    assert endless == ["y" * 16384]  # the line that never ended: its first 16 KiB, once
    # On disk: the current file and one rotated, each capped (2 MiB), whatever the app wrote.
    inst = platform.instances("hostile")[0]
    files = list((platform.data_dir / "logs" / "apps" / "hostile").glob(f"{inst['id']}.log*"))
    assert files and sum(f.stat().st_size for f in files) < 5 << 20, [(f, f.stat().st_size) for f in files]


def test_tmp_is_capped(platform: Platform, apps: dict[str, Any]) -> None:
    out = call(platform, "fill_tmp")
    assert out["error"] == "OSError" and out["errno"] == errno.ENOSPC
    assert 60 <= out["written_mb"] <= 64


def test_memory_bomb_is_oom_killed_in_its_cgroup(platform: Platform, apps: dict[str, Any]) -> None:
    status, body = platform.invoke("hostile", "hog")
    assert status == 502 and body["error"]["code"] == "bad_gateway"
    platform.wait_for(
        lambda: any(
            (i["status"].get("last_exit") or {}).get("reason", "").startswith("out of memory")
            for i in platform.instances("hostile")
        ),
        what="the OOM kill to be reported",
    )
    assert httpx.get(f"{platform.gateway}/victim/").text == "fine"
    platform.wait_for(lambda: platform.invoke("hostile", "whoami")[0] == 200, what="hostile to restart")
    # `osless invoke` says why, from the instance's exit as its node reported it.
    r = platform.cli("invoke", "hostile.hog", "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == {
        "code": "out_of_memory",
        "message": "the function ran out of memory (limit 256 MB): raise memory_mb in "
        "@app.function(memory_mb=...) of hog",
    }, r.stdout
    platform.wait_for(lambda: platform.invoke("hostile", "whoami")[0] == 200, what="hostile to restart")


def test_cpu_spinner_does_not_starve_the_other_app(platform: Platform, apps: dict[str, Any]) -> None:
    def p99() -> float:
        """The median p99 of three rounds of 100 requests: this machine is shared and noisy."""
        rounds = []
        with httpx.Client() as client:
            for _ in range(3):
                times = []
                for _ in range(100):
                    t0 = time.perf_counter()
                    assert client.get(f"{platform.gateway}/victim/").text == "fine"
                    times.append(time.perf_counter() - t0)
                rounds.append(statistics.quantiles(times, n=100)[98])
        return statistics.median(rounds)

    def attempt() -> tuple[float, float]:
        idle = p99()
        spinner = threading.Thread(
            target=platform.invoke, args=("hostile", "spin", {"seconds": 10, "threads": 4})
        )
        spinner.start()
        time.sleep(1)
        loaded = p99()
        spinner.join()
        return idle, loaded

    # Twice the idle p99, or 10 ms more, whichever is larger: on this 2-core host a CPU-bound
    # neighbour costs the kernel's wakeup latency (4-7 ms at p99 measured) however fast the idle
    # path is; being starved would cost a scheduling period or more each time. Up to three tries:
    # the other tests running beside this one (a worker per core) load the host in bursts, while a
    # starved victim would miss every time.
    seen = []
    for _ in range(3):
        idle, loaded = attempt()
        seen.append(f"p99 idle {idle * 1000:.2f} ms, with the spinner {loaded * 1000:.2f} ms")
        if loaded <= max(2 * idle, idle + 0.010):
            break
    else:
        raise AssertionError("; ".join(seen))


def test_volume_is_writable_and_survives_restarts(platform: Platform, apps: dict[str, Any]) -> None:
    assert platform.invoke("victim", "put", {"text": "kept"}) == (200, "stored")
    inst = platform.instances("victim")[0]
    import os
    import signal

    os.kill(inst["status"]["pid"], signal.SIGKILL)
    platform.wait_for(lambda: platform.invoke("victim", "get")[1] == "kept", what="the note after a restart")
    platform.deploy(APPS / "victim")  # a new release: new zygote, new sandbox, same volume
    assert platform.invoke("victim", "get") == (200, "kept")
    # On the host the volume is an image, mounted where only the node looks.
    host = run_dir_for(platform.data_dir) / "volumes" / "victim" / "victim-data" / "note.txt"
    assert host.read_text() == "kept"


def test_doctor_reports_every_protection(platform: Platform) -> None:
    checks = json.loads(platform.cli("doctor", "--json").stdout)
    names = {c["name"] for c in checks}
    assert {"user namespace", "pid namespace", "net namespace", "seccomp", "cgroups"} <= names
    assert all(c["ok"] for c in checks), checks


def cgroup_dirs(scopes: str = "*") -> set[Path]:
    """Instances' cgroups: of every platform on the host, or of the scopes named (a glob)."""
    return {
        d for c in ("memory", "cpu", "pids") for d in Path(f"/sys/fs/cgroup/{c}/osless").glob(f"{scopes}/i-*")
    }


def procs(cgroup: Path) -> list[str]:
    """The pids in `cgroup`; none once it is gone (another platform's may go while it is read)."""
    try:
        return (cgroup / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def test_nothing_is_left_behind_when_an_instance_ends(platform: Platform, apps: dict[str, Any]) -> None:
    call(platform, "leave_behind")
    inst = platform.instances("hostile")[0]
    mine = {d for d in cgroup_dirs() if str(inst["status"]["pid"]) in procs(d)}
    assert len(mine) == 3  # memory, cpu, pids
    scope = next(iter(mine)).parent.name  # this platform's: other platforms may run beside it
    before = cgroup_dirs(scope)
    sleepers = [int(p) for d in mine for p in procs(d)]
    assert len(set(sleepers)) == 2  # the instance, and the sleep it started in a session of its own
    platform.cli("scale", "hostile", "--min", "0", "--idle", "1")  # no traffic now: to zero within a second
    platform.wait_for(lambda: not platform.instances("hostile"), what="the instance to stop")
    platform.wait_for(lambda: not any(d.exists() for d in mine), what="its cgroups to be removed")
    for pid in sleepers:
        assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert cgroup_dirs(scope) - before <= {d for d in cgroup_dirs(scope) if not procs(d)}
    platform.cli("scale", "hostile", "--min", "1", "--idle", "60")
    platform.wait_for(lambda: platform.invoke("hostile", "whoami")[0] == 200, what="hostile to come back")
