"""W3C Trace Context's `traceparent` header (https://www.w3.org/TR/trace-context/): checked strictly,
or made anew. Stdlib only: the gateway checks each request's with it, and instances read it.

A client's header is its own input: only version 00 in its exact form (lowercase hex, trace and parent
ids not all zeros) is continued; anything else is replaced by a new trace, never passed on.

Recording every request's spans would cost an instance more than the request itself: the gateway
samples the traces it starts (`Sampler`, AWS X-Ray's default rule: the first of each second, and a
ratio of the others), and its choice, the header's `sampled` flag, goes along the whole trace. A
client that sends a sampled traceparent has its request recorded.
"""

from __future__ import annotations

import binascii
import contextvars
import math
import os
import random
import re
import struct
import time
from collections.abc import Callable

__all__ = ["HEADER", "UNRECORDED", "Sampler", "child", "new", "sampled", "valid"]

HEADER = "traceparent"
_FORM = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def valid(value: bytes) -> bool:
    """`value` is a traceparent this platform continues."""
    # The length first: most requests have no traceparent, and the regex is most of this call.
    return len(value) == 55 and _FORM.fullmatch(value) is not None


# The request's traceparent while it runs unrecorded (not sampled): its calls of other apps carry it on.
UNRECORDED: contextvars.ContextVar[str | None] = contextvars.ContextVar("osless_unrecorded", default=None)


# Ids made ahead, each a traceparent but its flags (`00-{trace id}-{parent id}-`): the gateway starts
# a trace for every request, and a read of the kernel's CSPRNG for each was a system call a request.
# Taken with `list.pop`, atomic under the GIL (an instance's threads may start traces too); emptied in
# a forked child, which must not hand out its parent's ids again.
_IDS_PER_READ = 128
_ids: list[bytes] = []
os.register_at_fork(after_in_child=_ids.clear)
# A read's hex cut into trace and parent ids, formatted and cut again, in C: a loop in Python over
# the ids cost each more than the rest of `new`.
_CUT = struct.Struct("32s16s" * _IDS_PER_READ)
_FORMAT = b"00-%s-%s-" * _IDS_PER_READ
_SPLIT = struct.Struct("53s" * _IDS_PER_READ)


def new(sampled: bool = True) -> bytes:
    """A traceparent that starts a new trace (its parent id stands for the hop that made it)."""
    try:
        ids = _ids.pop()
    except IndexError:
        _ids.extend(_SPLIT.unpack(_FORMAT % _CUT.unpack(binascii.hexlify(os.urandom(24 * _IDS_PER_READ)))))
        ids = _ids.pop()
    return ids + (b"01" if sampled else b"00")


def sampled(value: str) -> bool:
    """The `sampled` flag of a valid traceparent: its spans are recorded."""
    return value[-1:] in "13579bdf"  # the flags' lowest bit


_random = random.random  # the module's generator (which `random.seed` seeds), bound once: no lookup a call


class Sampler:
    """Which new traces are recorded: the first of each second, and `ratio` of the others (X-Ray's
    default rule), so a quiet app has every request traced and a busy one pays a ratio."""

    def __init__(self, ratio: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"a trace sample ratio is between 0 and 1, not {ratio}")
        self.ratio = ratio
        self._clock = clock
        self._next = -math.inf  # where the next second starts: its first trace is recorded

    def __call__(self) -> bool:
        now = self._clock()
        if now >= self._next:
            self._next = math.floor(now) + 1
            return True
        return _random() < self.ratio  # random() is below 1.0: a ratio of 1 records every trace


def child(value: bytes) -> bytes:
    """`value` continued if valid, else a new trace: what a platform hop passes on."""
    return value if valid(value) else new()
