"""runtime.zygote without an app: a release zygote's fork when it runs out of descriptors."""

from __future__ import annotations

import subprocess
import sys

_OUT_OF_FDS = """
import os, resource, socket
from osless.runtime import protocol
from osless.runtime.zygote import ReleaseZygote

def used() -> set[int]:  # without opening one, as listing /proc/self/fd would
    out = set()
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out

agent, control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
zygote = ReleaseZygote(control, None)  # the app's instance is the child's: no fork gets that far
before = used()
*given, spare = [fd for pair in (os.pipe(), os.pipe(), os.pipe()) for fd in pair]
os.close(spare)  # as the agent sends them: stdout, stderr, web, control, the access lines' pipe
free = sorted(set(range(4096)) - used())
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (free[2], hard))  # its socketpair, but not its pipe
try:
    zygote._fork({"op": "fork", "id": "i-1", "env": {}, "access": True}, given)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
msg, _ = protocol.recv(agent)
print(msg["op"], sorted(used() - before))
"""


def test_a_fork_out_of_descriptors_is_an_error_to_the_agent_and_leaks_none() -> None:
    """The zygote is out of descriptors at a fork's last pipe: the agent hears why, and what the
    fork was given and had made is closed (it was raised out of the zygote's loop, all left open)."""
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FDS], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.stdout.strip() == "error []", done.stderr
