"""gateway.outliers: a relay that failed is skipped for a pause that doubles while it keeps failing,
and is back once it takes a connection, the pause ends, or its node no longer announces it."""

from __future__ import annotations

import pytest

from osless.gateway import outliers
from osless.gateway.outliers import Outliers

A, B = ("10.0.0.2", 7000), ("10.0.0.3", 7000)


class Clock:
    """The gateway's monotonic clock, moved by the test: the pauses are checked at their edges, not
    against a sleep that a loaded machine may overrun."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_failed_relay_is_down_for_a_pause_that_doubles_while_it_keeps_failing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(outliers, "time", clock)
    pause = outliers.FIRST_PAUSE_S
    marks = Outliers()
    assert not marks.active() and not marks.down(A)
    marks.failed(A, "refused")
    assert marks.active() and marks.down(A) and not marks.down(B)
    clock.now += pause / 2
    marks.failed(A, "refused")  # a request that raced the first to it: the same failure
    clock.now += pause * 3 / 4  # past the first one's pause, not past any the second would begin
    assert not marks.down(A) and not marks.active()  # the pause is over: it may be tried again
    marks.failed(A, "refused again")
    clock.now += 2 * pause - 0.1
    assert marks.down(A)  # a second failure in a row: twice the pause
    clock.now += 0.2
    assert not marks.down(A)


def test_a_mark_goes_when_the_relay_takes_a_connection_or_is_no_longer_announced() -> None:
    marks = Outliers()
    marks.failed(A, "timeout")
    marks.failed(B, "timeout")
    marks.ok(A)
    assert not marks.down(A) and marks.down(B)
    marks.keep([A])  # B's node went (or moved): its mark is of no use
    assert not marks.down(B)
    marks.failed(B, "timeout")
    assert marks.down(B)  # a failure after that marks it again
