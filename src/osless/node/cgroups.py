"""Per-instance memory cgroups, on cgroup v2 or v1: a limit from `memory_mb`, and OOM kills detected.

Each instance gets `<memory root>/osless/<name>`; the agent moves the forked pid in, reads the OOM
counter when the instance ends, then removes the group. Where no memory controller can be used (not
root, no cgroupfs), `Cgroups.detect()` says why and instances run without a memory limit.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cgroups", "InstanceCgroup"]

CGROUP_FS = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class InstanceCgroup:
    path: Path
    version: int

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        """How many times the kernel's OOM killer struck inside this group."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (FileNotFoundError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        # rmdir fails while a process is still inside; the caller removes it after the exit
        with contextlib.suppress(FileNotFoundError, OSError):
            self.path.rmdir()


@dataclass(frozen=True)
class Cgroups:
    root: Path  # the folder under which instance groups are made
    version: int

    @classmethod
    def detect(cls, fs: Path = CGROUP_FS) -> Cgroups | str:
        """A usable memory hierarchy, or the reason there is none."""
        if (fs / "cgroup.controllers").exists():
            if "memory" not in (fs / "cgroup.controllers").read_text().split():
                return "cgroup v2 is mounted without the memory controller"
            root = fs / "osless"
            try:
                root.mkdir(exist_ok=True)
                # groups inside `osless` may only limit memory once it is delegated to them
                with open(fs / "cgroup.subtree_control", "w") as f:
                    f.write("+memory")
                with open(root / "cgroup.subtree_control", "w") as f:
                    f.write("+memory")
            except OSError as e:
                return f"cannot set up cgroup v2 memory control at {root}: {e.strerror}"
            return cls(root, 2)
        memory = fs / "memory"
        if not (memory / "memory.limit_in_bytes").exists():
            return "no cgroup memory controller is mounted at /sys/fs/cgroup"
        root = memory / "osless"
        try:
            root.mkdir(exist_ok=True)
        except OSError as e:
            return f"cannot create {root}: {e.strerror} (memory limits need root)"
        if not os.access(root, os.W_OK):
            return f"cannot write to {root} (memory limits need root)"
        return cls(root, 1)

    def create(self, name: str, memory_mb: int) -> InstanceCgroup:
        path = self.root / name
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        limit = str(memory_mb * 1024 * 1024)
        if self.version == 2:
            (path / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):  # no swap accounting on some hosts
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):  # memsw exists only with swap accounting on
                (path / "memory.memsw.limit_in_bytes").write_text(limit)
        return InstanceCgroup(path, self.version)
