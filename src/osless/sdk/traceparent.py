"""W3C Trace Context's `traceparent` header (https://www.w3.org/TR/trace-context/): checked strictly,
or made anew. Stdlib only: the gateway checks each request's with it, and instances read it.

A client's header is its own input: only version 00 in its exact form (lowercase hex, trace and parent
ids not all zeros) is continued; anything else is replaced by a new trace, never passed on.
"""

from __future__ import annotations

import os
import re

__all__ = ["HEADER", "child", "new", "valid"]

HEADER = "traceparent"
_FORM = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def valid(value: bytes) -> bool:
    """`value` is a traceparent this platform continues."""
    return _FORM.fullmatch(value) is not None


def new() -> bytes:
    """A traceparent that starts a new, sampled trace (its parent id stands for the hop that made it)."""
    ids = os.urandom(24).hex().encode()  # one read of the kernel's CSPRNG for both ids: on every request
    return b"00-%s-%s-01" % (ids[:32], ids[32:])


def child(value: bytes) -> bytes:
    """`value` continued if valid, else a new trace: what a platform hop passes on."""
    return value if _FORM.fullmatch(value) is not None else new()
