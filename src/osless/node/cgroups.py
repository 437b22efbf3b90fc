"""Per-instance cgroups on v2 or v1: memory from `memory_mb`, a CPU share and quota, a pids limit.

Each instance gets one group (v2) or one group in each of the memory, cpu and pids hierarchies
(v1), named alike under an `osless` folder. The forked instance moves itself in through
`cgroup.procs` files the agent opened for it, before any app code runs. When it ends, whatever is
left inside is killed, the OOM counter read, and the group removed. Empty groups are made ahead
of time, so creating them is off the path of a cold start.

The kernel's accounting of each group (memory in use, CPU time) is what the node's `/metrics` and
the usage figures read: v2's `memory.current` and `cpu.stat`; v1's `memory.usage_in_bytes` and
`cpuacct.usage`, from the cpuacct hierarchy (a group there too, unless it is mounted with cpu).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cgroups", "InstanceCgroup", "Limits"]

CGROUP_FS = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
POOL_SIZE = 4
# All of a host's instances together weigh as much as one process (the kernel's default), at each
# level (all nodes' `osless`, each node's folder): when the CPU is contended, a busy app cannot take
# more from a gateway process that serves every other app than one process would, and the apps that
# answer the gateway's requests are not starved by every other process on the host either. (At a
# quarter of one, any load on the host, the load generator of a benchmark, a build, preempted the
# instances at each of the gateway's wakeups: each answer cost a context switch or more, and under
# load throughput fell to a tenth of uvicorn's alone; benchmarks/throughput.py.)
APPS_CPU_SHARES = 1024


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 256
    cpu_shares: int = 1024  # relative weight; v2 maps it to cpu.weight
    cpu_quota: float | None = 1.0  # CPUs at most; None for no cap
    pids: int = 128  # threads count too: a busy instance uses a few dozen


@dataclass
class InstanceCgroup:
    dirs: list[Path]  # one per hierarchy (v1) or just one (v2)
    version: int

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def open_join_files(self) -> list[int]:
        """Files the new instance writes "0" to, moving itself in before any app code runs.

        On v1 that is `tasks`: a single thread moving itself skips the kernel's global
        threadgroup lock, whose writer waits for an RCU grace period (7-25 ms on an idle host,
        0.6 ms this way). The instance is still single-threaded then, and later threads follow it.
        """
        name = "tasks" if self.version == 1 else "cgroup.procs"
        return [os.open(d / name, os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs]

    def pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs_files:
            with contextlib.suppress(FileNotFoundError, ValueError):
                out += [int(x) for x in p.read_text().split()]
        return sorted(set(out))

    def memory_bytes(self) -> int:
        """Memory in use by the group now (page cache included, as the limit counts it)."""
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.dirs[0] / name).read_text())
        return 0

    def cpu_seconds(self) -> float:
        """CPU time the group's processes have used, user and system, since it was made."""
        if self.version == 2:
            with contextlib.suppress(FileNotFoundError, ValueError):
                for line in (self.dirs[0] / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) / 1e6
            return 0.0
        for d in self.dirs[1:]:  # cpu (when cpuacct is mounted with it), then cpuacct's own
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int((d / "cpuacct.usage").read_text()) / 1e9
        return 0.0

    def oom_kills(self) -> int:
        """How many times the kernel's OOM killer struck inside this group."""
        for d in self.dirs:
            name = "memory.events" if self.version == 2 else "memory.oom_control"
            with contextlib.suppress(FileNotFoundError, ValueError):
                for line in (d / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def kill_all(self, timeout: float = 2.0) -> None:
        """Nothing an instance started may outlive it."""
        if self.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()


@dataclass
class Cgroups:
    roots: list[Path]  # the `osless` folder in each hierarchy used
    version: int
    _pool: list[InstanceCgroup] = field(default_factory=list)

    @classmethod
    def detect(cls, scope: str = "", fs: Path = CGROUP_FS) -> Cgroups | str:
        """Usable memory, cpu and pids control, or the reason there is none.

        `scope` names this agent's own folder under `osless` (several agents, or test runs, may
        share a host): `sweep` only ever touches groups in it.
        """
        if (fs / "cgroup.controllers").exists():
            have = (fs / "cgroup.controllers").read_text().split()
            lacking = [c for c in V1_CONTROLLERS if c not in have]
            if lacking:
                return f"cgroup v2 is mounted without the {', '.join(lacking)} controller(s)"
            root = fs / "osless" / scope if scope else fs / "osless"
            try:
                root.mkdir(parents=True, exist_ok=True)
                # Groups inside may only limit what is delegated to them, at every level.
                for folder in (fs, fs / "osless", root):
                    with open(folder / "cgroup.subtree_control", "w") as f:
                        f.write("+memory +cpu +pids")
            except OSError as e:
                return f"cannot set up cgroup v2 control at {root}: {e.strerror}"
            for folder in {fs / "osless", root}:
                with contextlib.suppress(OSError):
                    (folder / "cpu.weight").write_text(str(max(1, APPS_CPU_SHARES * 100 // 1024)))
            return cls([root], 2)
        roots = []
        for controller in V1_CONTROLLERS:
            if not (fs / controller / "cgroup.procs").exists():
                return f"no cgroup v1 {controller} hierarchy is mounted at {fs / controller}"
            root = fs / controller / "osless" / scope if scope else fs / controller / "osless"
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                return f"cannot create {root}: {e.strerror} (resource limits need root)"
            if not os.access(root, os.W_OK):
                return f"cannot write to {root} (resource limits need root)"
            roots.append(root)
        # CPU accounting: cpuacct mounted apart from cpu (no `cpuacct.usage` in cpu's groups) gets a
        # group of its own; without it, CPU time reads as 0, nothing else is lost.
        acct = fs / "cpuacct"
        if (acct / "cgroup.procs").exists() and not (fs / "cpu" / "cpuacct.usage").exists():
            root = acct / "osless" / scope if scope else acct / "osless"
            with contextlib.suppress(OSError):
                root.mkdir(parents=True, exist_ok=True)
                if os.access(root, os.W_OK):
                    roots.append(root)
        for folder in {fs / "cpu" / "osless", roots[1]}:
            with contextlib.suppress(OSError):
                (folder / "cpu.shares").write_text(str(APPS_CPU_SHARES))
        return cls(roots, 1)

    def _make(self) -> InstanceCgroup:
        name = "i-" + secrets.token_hex(6)
        dirs = [r / name for r in self.roots]
        for d in dirs:
            d.mkdir()
        return InstanceCgroup(dirs, self.version)

    def fill_pool(self) -> None:
        """Create empty groups ahead, so a cold start only writes its limits."""
        while len(self._pool) < POOL_SIZE:
            self._pool.append(self._make())

    def create(self, limits: Limits) -> InstanceCgroup:
        group = self._pool.pop() if self._pool else self._make()
        try:
            self._limit(group, limits)
        except OSError:
            group.remove()  # half-limited: never handed out, nor back to the pool
            raise
        return group

    def _limit(self, group: InstanceCgroup, limits: Limits) -> None:
        memory = str(limits.memory_mb * 1024 * 1024)
        period = 20_000  # short: a quota spent in bursts across cores stalls its neighbours less
        quota = "max" if limits.cpu_quota is None else str(int(limits.cpu_quota * period))
        if self.version == 2:
            d = group.dirs[0]
            (d / "memory.max").write_text(memory)
            with contextlib.suppress(OSError):  # no swap accounting on some hosts
                (d / "memory.swap.max").write_text("0")
            (d / "cpu.weight").write_text(str(max(1, min(10000, limits.cpu_shares * 100 // 1024))))
            (d / "cpu.max").write_text(f"{quota} {period}")
            (d / "pids.max").write_text(str(limits.pids))
        else:
            mem, cpu, pids = group.dirs[:3]
            (mem / "memory.limit_in_bytes").write_text(memory)
            with contextlib.suppress(OSError):  # memsw exists only with swap accounting on
                (mem / "memory.memsw.limit_in_bytes").write_text(memory)
            (cpu / "cpu.shares").write_text(str(limits.cpu_shares))
            (cpu / "cpu.cfs_period_us").write_text(str(period))
            (cpu / "cpu.cfs_quota_us").write_text("-1" if quota == "max" else quota)
            (pids / "pids.max").write_text(str(limits.pids))

    def sweep(self) -> None:
        """Remove what an earlier run of this agent left (after kill -9, say): only in its own scope."""
        for root in self.roots:
            for d in root.glob("i-*"):
                if d not in {x for g in self._pool for x in g.dirs}:
                    InstanceCgroup([d], self.version).kill_all(timeout=0.5)
                    with contextlib.suppress(OSError):
                        d.rmdir()

    def close(self) -> None:
        """Remove the unused pool and, once empty, this agent's own folders."""
        for group in self._pool:
            group.remove()
        self._pool.clear()
        for root in self.roots:
            with contextlib.suppress(OSError):
                root.rmdir()
