"""A platform child dies with its parent: PR_SET_PDEATHSIG, set in the child before it runs.

The platform's processes (the gateway processes, the builder, nats-server, a cluster's parts) are
children of `osless up` or `osless node join`: however the parent dies, even by SIGKILL, the kernel
signals them. (The runtime's zygotes and forwarders, which run in the runtime layer without the
rest of osless, set it on their own.)
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """In the child (a Popen's preexec_fn, or its first line): `sig` when `parent` dies, and an exit at
    once if it already has (it died before the prctl took effect: no signal would ever come)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        os._exit(1)
