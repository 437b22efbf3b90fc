"""Who listens on a unix socket (SO_PEERCRED), checked before a byte is sent to it.

An instance's socket path is the node's, but a process that got to listen there first (a stale
run, anything else on the host) must not get a request meant for the instance: the gateway and the
node's relay both connect only when the listener is the process the node agent started, as its uid.
"""

from __future__ import annotations

import asyncio
import socket
import struct

__all__ = ["PeerMismatch", "check_peer"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PeerMismatch(OSError):
    """The socket's listener is not the expected process (or cannot be told)."""


def check_peer(transport: asyncio.BaseTransport, expected: tuple[int, int], path: str) -> None:
    """Raise `PeerMismatch` unless the process at the other end of `transport` (connected to the
    unix socket `path`) is `expected` (pid, uid). The caller aborts the connection."""
    sock = transport.get_extra_info("socket")
    try:
        if sock is None:
            raise OSError("no socket")
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _ = _UCRED.unpack(cred)
    except OSError as e:
        raise PeerMismatch(f"cannot tell who listens on {path}: {e}") from e
    if (pid, uid) != expected:
        raise PeerMismatch(
            f"{path} is served by pid {pid} uid {uid}, not by the instance (pid {expected[0]} "
            f"uid {expected[1]}): refused"
        )
