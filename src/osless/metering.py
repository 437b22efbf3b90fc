"""The latency buckets the gateway counts requests in, and percentiles read from them: shared by the
gateway (which counts), the node (which sums and samples) and the API (which merges nodes)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BUCKETS", "quantile"]

# Seconds, fixed: a request's latency lands in one of these without an allocation; one more count
# follows the last, for past all of them.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def quantile(q: float, counts: Sequence[int], bounds: Sequence[float] = BUCKETS) -> float | None:
    """The `q` quantile (0..1) of what `counts` (per bucket, not cumulative) hold, interpolated
    inside its bucket as Prometheus' histogram_quantile does; None if they hold nothing."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):  # past the last bound: said as the last bound
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / n
        seen += n
    return bounds[-1]
