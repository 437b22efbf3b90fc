"""Requests per caller: a token bucket per key, in a bounded LRU so strangers cannot grow memory."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Buckets", "Rate"]


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    burst: float


class Buckets:
    """One token bucket per key; the least recently seen keys are forgotten past `size` (a forgotten
    key starts again with a full bucket, which costs an attacker nothing it could not get by waiting)."""

    def __init__(
        self, rate: Rate, *, size: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.size = size
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 if `key` may go now (and it is counted); else the seconds until it may."""
        at = self.clock()
        tokens, last = self._buckets.pop(key, (self.rate.burst, at))
        tokens = min(self.rate.burst, tokens + (at - last) * self.rate.per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate.per_s
        self._buckets[key] = (tokens, at)
        if len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> str:
        """The Retry-After value (whole seconds, at least 1) for a wait."""
        return str(max(1, math.ceil(wait)))
