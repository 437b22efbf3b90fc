"""The zygote control channel: one JSON object per SOCK_SEQPACKET packet, fds passed as SCM_RIGHTS."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_FDS", "MAX_PACKET", "ProtocolError", "recv", "send"]

MAX_PACKET = 64 * 1024
MAX_FDS = 16


class ProtocolError(Exception):
    """A packet that is not one JSON object within the limits."""


def send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send `msg` as one packet; SEQPACKET keeps it whole, so the reader never reassembles."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_PACKET}-byte packet limit")
    # send, not sendall: a SEQPACKET send is all or nothing, never partial.
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one packet: (message, fds), or (None, []) at EOF. The caller owns the fds."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_PACKET, MAX_FDS)
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("packet truncated: over the size or fd limit")
        try:
            msg = json.loads(data)
        except ValueError as e:
            raise ProtocolError(f"packet is not JSON: {e}") from e
        if not isinstance(msg, dict):
            raise ProtocolError(f"packet is JSON {type(msg).__name__}, not an object")
    except ProtocolError:
        # Nobody will claim fds that came with a bad packet; close them rather than leak them.
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds
