"""Token buckets: the burst, the refill, the wait to announce, and memory bounded whoever calls."""

from __future__ import annotations

from osless.api.ratelimit import Buckets, Rate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    buckets = Buckets(Rate(per_s=2, burst=3), clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == 0.5  # one token comes back every half second
    assert buckets.take("b") == 0  # each key has its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0
    assert Buckets.retry_after(0.5) == "1" and Buckets.retry_after(2.1) == "3"
    clock.now += 60
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, never past it


def test_buckets_forget_the_least_recently_seen_past_their_size() -> None:
    buckets = Buckets(Rate(per_s=1, burst=1), size=3, clock=Clock())
    for i in range(1000):
        buckets.take(f"stranger-{i}")
    assert len(buckets._buckets) == 3
    assert buckets.take("stranger-999") > 0  # the recent ones are still counted
