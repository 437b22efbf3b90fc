"""The node relay's wire format, spoken by a gateway (`gateway.upstream`) to another node's relay
(`node.relay`).

One line opens the connection: `OSLESS-RELAY/1 <gateway token> <instance id> web|control\\n`, at most
`MAX_PREAMBLE` bytes; the relay answers `OK\\n`, after which the bytes are the instance's socket's
both ways, or `ERR <code> <message>\\n` and closes. The token travels in clear: nodes are meant to
share a private network (TLS between nodes is later work).

`web` is the instance's web socket, `control` its control socket: function calls (`POST
/invoke/{function}`, what a gateway sends there) and `/health`, nothing else. The relay opens the
paths its node's supervisor gave; a preamble names no path. An instance's config reaches it over a
socketpair from its zygote, which has no path and so no way in from here.
"""

from __future__ import annotations

import re

__all__ = [
    "KINDS",
    "MAX_ANSWER",
    "MAX_PREAMBLE",
    "OK",
    "VERSION",
    "Preamble",
    "error_line",
    "parse",
    "preamble",
]

VERSION = b"OSLESS-RELAY/1"
MAX_PREAMBLE = 4096
MAX_ANSWER = 1024  # the relay's answer line, as the gateway reads it
OK = b"OK\n"
KINDS = ("web", "control")  # the instance's two sockets
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,512}")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class Preamble:
    """What a preamble asks for."""

    __slots__ = ("instance", "kind", "token")

    def __init__(self, token: str, instance: str, kind: str) -> None:
        self.token = token
        self.instance = instance
        self.kind = kind


def preamble(token: str, instance: str, kind: str) -> bytes:
    return b" ".join((VERSION, token.encode("ascii"), instance.encode("ascii"), kind.encode("ascii"))) + b"\n"


def parse(line: bytes) -> Preamble:
    """The preamble line (without its newline); ValueError saying what is wrong with it."""
    parts = line.rstrip(b"\r").split(b" ")
    if not parts or parts[0] != VERSION:
        raise ValueError(f"not a relay preamble: it starts with {VERSION.decode()}")
    if len(parts) != 4:
        raise ValueError(f"the preamble is `{VERSION.decode()} <token> <instance> web|control`")
    try:
        token, instance, kind = (p.decode("ascii") for p in parts[1:])
    except UnicodeDecodeError:
        raise ValueError("the preamble is ASCII") from None
    if not _TOKEN.fullmatch(token):
        raise ValueError("the token is not one")
    if not _INSTANCE.fullmatch(instance):
        raise ValueError("the instance id is not one")
    if kind not in KINDS:
        raise ValueError(f"the socket is web or control, not {kind[:20]!r}")
    return Preamble(token, instance, kind)


def error_line(code: str, message: str) -> bytes:
    """`ERR <code> <message>\\n`, one line whatever the message holds."""
    flat = " ".join(message.split())[: MAX_ANSWER - len(code) - 8]
    return f"ERR {code} {flat}\n".encode("ascii", "replace")
