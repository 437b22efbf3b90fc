"""Passive health of other nodes' relays: an address that just failed to take a connection is
skipped for a pause, so that the next requests do not pay the same refusal or timeout.

Like Envoy's outlier detection, learnt from real traffic rather than probes: a relay that refused
a connection, or gave no handshake or answer in time, is marked down; the router then prefers
instances elsewhere (`Router.pick_now`). The pause doubles with each failure in a row (a machine
that stays dead costs one try per pause), and the mark goes once a connection through the relay
succeeds, the pause ends, or the node stops announcing that address (the routing table changed).
A mark is a preference, never a verdict: when every candidate is marked, one is tried anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

__all__ = ["Address", "Outliers"]

log = logging.getLogger("osless.gateway")

Address = tuple[str, int]  # a relay's (host, port)

FIRST_PAUSE_S = 2.0
MAX_PAUSE_S = 30.0


class Outliers:
    """The relay addresses marked down, and until when."""

    def __init__(self) -> None:
        self._marks: dict[Address, tuple[int, float]] = {}  # address -> (failures in a row, until)
        self._until = 0.0  # the latest end of any pause: nothing is down past it

    def active(self) -> bool:
        """Whether any address may be down now (cheap: asked on each request that has a choice)."""
        return self._until > time.monotonic()

    def down(self, address: Address) -> bool:
        mark = self._marks.get(address)
        return mark is not None and mark[1] > time.monotonic()

    def failed(self, address: Address, why: str) -> None:
        """A connection through `address` failed before its relay said OK, for `why` (logged:
        it names the relay)."""
        now = time.monotonic()
        strikes, until = self._marks.get(address, (0, 0.0))
        if until > now:
            return  # already down: the requests that raced to it are one failure, not many
        pause = min(FIRST_PAUSE_S * 2**strikes, MAX_PAUSE_S)
        self._marks[address] = (strikes + 1, now + pause)
        self._until = max(self._until, now + pause)
        log.warning("%s; its node is skipped for %.0fs", why, pause)

    def ok(self, address: Address) -> None:
        """A connection through `address` was taken: it is up."""
        if address in self._marks:
            del self._marks[address]

    def keep(self, announced: Collection[Address]) -> None:
        """The nodes now announce these relays: marks of any other address go."""
        for address in [a for a in self._marks if a not in announced]:
            del self._marks[address]
