"""gateway.outliers: a relay that failed is skipped for a pause that doubles while it keeps failing,
and is back once it takes a connection, the pause ends, or its node no longer announces it."""

from __future__ import annotations

import time

import pytest

from osless.gateway import outliers
from osless.gateway.outliers import Outliers

A, B = ("10.0.0.2", 7000), ("10.0.0.3", 7000)


def test_a_failed_relay_is_down_for_a_pause_that_doubles_while_it_keeps_failing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outliers, "FIRST_PAUSE_S", 0.2)
    marks = Outliers()
    assert not marks.active() and not marks.down(A)
    marks.failed(A, "refused")
    assert marks.active() and marks.down(A) and not marks.down(B)
    marks.failed(A, "refused")  # a request that raced the first to it: the same failure
    time.sleep(0.25)
    assert not marks.down(A) and not marks.active()  # the pause is over: it may be tried again
    marks.failed(A, "refused again")
    time.sleep(0.25)
    assert marks.down(A)  # a second failure in a row: twice the pause
    time.sleep(0.2)
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
