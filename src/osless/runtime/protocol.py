"""The zygote control channel: one JSON object per SOCK_SEQPACKET packet, fds passed as SCM_RIGHTS."""

from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_FDS", "MAX_PACKET", "ProtocolError", "recv", "recv_with_sender", "send"]

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
    return _decode(data, fds, flags)


_UCRED = struct.Struct("iII")  # pid, uid, gid


def recv_with_sender(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int], int | None]:
    """Like `recv`, plus the sender's pid as this process's pid namespace sees it.

    Needs SO_PASSCRED on `sock`. A process in a sandbox's pid namespace knows only its inner pid;
    the kernel translates the credentials it attaches, so the agent learns the real one.
    """
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_PACKET, socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(_UCRED.size)
    )
    fds: list[int] = []
    pid = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _UCRED.unpack(payload[: _UCRED.size])[0]
    msg, fds = _decode(data, fds, flags)
    return msg, fds, pid


def _decode(data: bytes, fds: list[int], flags: int) -> tuple[dict[str, Any] | None, list[int]]:
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
