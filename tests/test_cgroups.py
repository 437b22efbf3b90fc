"""Per-instance cgroups on v2, in a cgroup2 filesystem this test mounts itself (the host may be v1).

On a host whose memory, cpu and pids controllers are bound to v1 hierarchies (this one), a fresh
cgroup2 mount has none of them: groups can be made, joined, killed and removed there, but no limit
file exists to be written. Where the controllers are on v2, the limits are checked as well.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osless.node.cgroups import Cgroups, InstanceCgroup, Limits
from tests.platform import running


@pytest.fixture
def cgroup2(tmp_path: Path) -> Iterator[Path]:
    """A cgroup2 filesystem mounted at a folder of the test's own, unmounted after it."""
    mount = tmp_path / "cgroup2"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(
            f"cannot mount cgroup2 here (the tests need root and a kernel with cgroup2): {r.stderr.strip()}"
        )
    made = not (mount / "osless").exists()  # the same hierarchy as the host's own v2 mount, if any
    try:
        yield mount
    finally:
        # Whatever a failed test left: its processes, then its groups, deepest first.
        for d in sorted((mount / "osless").rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                InstanceCgroup([d], 2).kill_all(timeout=1)
                with contextlib.suppress(OSError):
                    d.rmdir()
        if made:
            with contextlib.suppress(OSError):
                (mount / "osless").rmdir()
        subprocess.run(["umount", str(mount)], check=True)


def groups_of(pid: int) -> str:
    """The process's group in the v2 hierarchy, as /proc says (the `0::` line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def start_in(group: InstanceCgroup) -> subprocess.Popen[bytes]:
    """A process that joins `group` as an instance does (writing "0" to the file the agent opened
    for it), then starts a child in a session of its own, as an app trying to outlive it would."""
    fds = group.open_join_files()
    script = (
        "import os, subprocess, sys, time\n"
        "for fd in map(int, sys.argv[1:]):\n"
        "    os.write(fd, b'0')\n"
        "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
        "print('joined', flush=True)\n"
        "time.sleep(1000)\n"
    )
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, fds)], pass_fds=fds, stdout=subprocess.PIPE
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert proc.stdout is not None and proc.stdout.readline() == b"joined\n"
    return proc


def test_v2_groups_are_made_joined_killed_and_removed(cgroup2: Path) -> None:
    scope = "test-" + secrets.token_hex(4)
    found = Cgroups.detect(scope=scope, fs=cgroup2)
    controllers = (cgroup2 / "cgroup.controllers").read_text().split()
    if isinstance(found, str):
        # Bound to v1 here: detect says so, and what v2 does without them is still exercised.
        missing = [c for c in ("memory", "cpu", "pids") if c not in controllers]
        assert missing and found == f"cgroup v2 is mounted without the {', '.join(missing)} controller(s)"
        root = cgroup2 / "osless" / scope
        root.mkdir(parents=True)
        cgroups = Cgroups([root], 2)
    else:
        cgroups = found
        root = cgroups.roots[0]
    assert cgroups.version == 2 and root.is_dir()

    cgroups.fill_pool()  # made ahead of any start: real groups, with the kernel's files in them
    pool = [g.dirs[0] for g in cgroups._pool]
    assert len(pool) == 4 and all((d / "cgroup.procs").is_file() for d in pool)
    if isinstance(found, Cgroups):
        group = cgroups.create(Limits(memory_mb=64, cpu_quota=0.5, pids=32))
        d = group.dirs[0]
        assert (d / "memory.max").read_text().strip() == str(64 << 20)
        assert (d / "cpu.max").read_text().split() == ["10000", "20000"]
        assert (d / "pids.max").read_text().strip() == "32"
    else:
        for name in ("memory.max", "cpu.max", "cpu.weight", "pids.max"):  # nothing to write them to
            assert not (pool[0] / name).exists()
        group = cgroups._pool.pop()
    assert group.version == 2 and len(group.dirs) == 1

    proc = start_in(group)
    try:
        members = group.pids()
        assert proc.pid in members and len(members) == 2  # the process and the sleep it started
        for pid in members:
            assert groups_of(pid) == "/" + str(group.dirs[0].relative_to(cgroup2))
        assert group.oom_kills() == 0
        assert (group.dirs[0] / "cgroup.kill").exists()  # the kernel's one-write kill of a group
        t0 = time.monotonic()
        group.kill_all()
        assert group.pids() == [] and time.monotonic() - t0 < 1.5
        proc.wait(5)
        for pid in members:
            assert not running(pid)
        group.remove()
        assert not group.dirs[0].exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()

    # A later run of the agent sweeps what an earlier one left (after kill -9, say): in its scope only.
    leftover = cgroups._make()
    stray = start_in(leftover)
    other = cgroup2 / "osless" / (scope + "-other") / "i-keep"
    other.mkdir(parents=True)
    try:
        stray_pids = leftover.pids()
        again = Cgroups([root], 2)
        again.sweep()
        assert not leftover.dirs[0].exists() and all(not running(p) for p in stray_pids)
        assert other.is_dir()  # another agent's group
    finally:
        with contextlib.suppress(ProcessLookupError):
            stray.kill()
        stray.wait(5)
        assert stray.stdout is not None
        stray.stdout.close()
        other.rmdir()
        other.parent.rmdir()
    cgroups.close()
    assert not root.exists() and not any(d.exists() for d in pool)


def test_instances_together_weigh_one_process_at_every_level() -> None:
    # On the host's own hierarchy: the weight that counts against the gateway's processes (and any
    # other on the host) is that of `osless`, where every node's folder is; below it, each node's.
    # A quarter of one process starved the instances under any load (benchmarks/throughput.py).
    scope = "test-" + secrets.token_hex(4)
    found = Cgroups.detect(scope=scope)
    assert isinstance(found, Cgroups), found
    try:
        if found.version == 1:
            levels = [Path("/sys/fs/cgroup/cpu/osless"), found.roots[1]]
            assert [int((d / "cpu.shares").read_text()) for d in levels] == [1024, 1024]
        else:
            levels = [Path("/sys/fs/cgroup/osless"), found.roots[0]]
            assert [int((d / "cpu.weight").read_text()) for d in levels] == [100, 100]
    finally:
        found.close()
