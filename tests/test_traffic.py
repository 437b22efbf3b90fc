"""The gateway's traffic figures: the average in flight over each report's interval."""

from __future__ import annotations

from osless.gateway.traffic import Traffic


class Clock:
    """The loop's time, set by the test: the figures are arithmetic on it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_concurrency_is_the_time_in_flight_over_the_interval_across_its_ends() -> None:
    clock = Clock()
    traffic = Traffic(clock)
    a = traffic.of("a")
    a.start(100.0)  # in flight the whole first interval and half of the second
    clock.now = 100.5
    a.start(100.5)  # half of the first interval
    a.end(101.0)
    clock.now = 101.0
    interval, apps = traffic.snapshot()
    assert interval == 1.0
    assert apps["a"] == {"concurrency": 1.5, "requests": 2.0, "waiting": 0.0}
    a.end(101.5)
    clock.now = 101.5
    with traffic.waiting("a"):  # a quarter of the second interval
        clock.now = 101.75
    clock.now = 102.0
    _, apps = traffic.snapshot()
    assert apps["a"] == {"concurrency": 0.5, "requests": 0.0, "waiting": 0.25}
    assert "a" not in traffic.apps and traffic.in_flight("a") == 0  # no request started: forgotten
