"""Which protections this host gives an app's sandbox, each found by trying it, not by guessing."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

from osless.node import volumes
from osless.node.cgroups import Cgroups
from osless.runtime import sandbox, seccomp

__all__ = ["REQUIRED", "VOLUME_QUOTAS", "Protection", "check"]

NAMESPACES = {
    "user namespace": sandbox.CLONE_NEWUSER,
    "mount namespace": sandbox.CLONE_NEWNS,
    "pid namespace": sandbox.CLONE_NEWPID,
    "net namespace": sandbox.CLONE_NEWNET,
    "ipc namespace": sandbox.CLONE_NEWIPC,
    "uts namespace": sandbox.CLONE_NEWUTS,
}
# Without these there is no sandbox at all; the rest can be missing with a warning.
REQUIRED = ("root", "user namespace", "mount namespace", "pid namespace", "net namespace")
VOLUME_QUOTAS = "volume quotas"


@dataclass(frozen=True)
class Protection:
    name: str
    ok: bool
    detail: str


def _try_unshare(flags: int) -> str | None:
    """Unshare in a throwaway child; the error, if any."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        libc = ctypes.CDLL(None, use_errno=True)
        err = 0 if libc.unshare(flags) == 0 else ctypes.get_errno()
        os.write(w, str(err).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 16)
    os.close(r)
    os.waitpid(pid, 0)
    err = int(out or b"1")
    return None if err == 0 else os.strerror(err)


def check() -> list[Protection]:
    if sys.platform != "linux":
        return [Protection("linux", False, f"{sys.platform} has no namespaces, cgroups or seccomp")]
    out = [
        Protection(
            "root",
            os.geteuid() == 0,
            "running as root"
            if os.geteuid() == 0
            else "not root: a sandbox cannot map its root to another uid, nor bind the runtime",
        )
    ]
    for name, flag in NAMESPACES.items():
        extra = sandbox.CLONE_NEWUSER if flag != sandbox.CLONE_NEWUSER else 0
        error = _try_unshare(flag | extra)
        out.append(Protection(name, error is None, "available" if error is None else error))
    reason = seccomp.unavailable_reason()
    out.append(Protection("seccomp", reason is None, "filter loads" if reason is None else reason))
    found = Cgroups.detect()
    if isinstance(found, Cgroups):
        out.append(Protection("cgroups", True, f"v{found.version}: memory, cpu and pids limits"))
    else:
        out.append(Protection("cgroups", False, found))
    reason = volumes.unavailable_reason()
    if reason is None:
        out.append(
            Protection(VOLUME_QUOTAS, True, "an ext4 image per volume: writes past its size get ENOSPC")
        )
    else:
        out.append(
            Protection(VOLUME_QUOTAS, False, f"{reason}; volumes are plain folders with no size limit")
        )
    return out
