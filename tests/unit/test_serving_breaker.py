"""The online store's circuit breaker on a fake clock: opens after N failures in a row, refuses
reads while open, lets one probe through after the open period, closes on its success."""

from __future__ import annotations

import pytest

from examples.delivery.features import restaurant_orders
from feature_repo.errors import OnlineStoreError, OnlineStoreUnavailableError
from serving.breaker import BreakerOpenError, BreakerState, CircuitBreaker, GuardedReader
from tests.helpers.serving import FakeReader


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read afresh each time (mypy would otherwise narrow the property after one assert)."""
    return breaker.state


def breaker_on(clock: Clock, moves: list[tuple[str, str]] | None = None) -> CircuitBreaker:
    return CircuitBreaker(
        3,
        0.5,
        clock=clock,
        on_transition=None if moves is None else lambda a, b: moves.append((a.value, b.value)),
    )


def test_opens_after_failures_in_a_row_only(clock):
    breaker = breaker_on(clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # the count is of failures in a row
    breaker.failure()
    breaker.failure()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()


def test_one_probe_after_the_open_period_closes_it(clock):
    moves: list[tuple[str, str]] = []
    breaker = breaker_on(clock, moves)
    for _ in range(3):
        breaker.failure()
    clock.now += 0.499
    assert not breaker.allow()
    clock.now += 0.002
    assert breaker.allow()  # the probe
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one at a time
    breaker.success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_it_for_another_period(clock):
    breaker = breaker_on(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 0.5
    assert breaker.allow()
    breaker.failure()  # one failure of the probe is enough
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.4
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_a_probe_that_never_reports_is_given_up_after_a_period(clock):
    breaker = breaker_on(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 0.5
    assert breaker.allow()
    clock.now += 0.3
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow()  # a new probe


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="failures >= 1 and open_s > 0"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="failures >= 1 and open_s > 0"):
        CircuitBreaker(1, 0)


def test_guarded_reader_stops_asking_a_dead_store(clock):
    reader = FakeReader()
    guarded = GuardedReader(reader, breaker_on(clock))
    request = [(restaurant_orders, ["r001"])]
    reader.fail = OnlineStoreUnavailableError("timeout")
    for _ in range(3):
        with pytest.raises(OnlineStoreUnavailableError):
            guarded.read_many(request)
    assert len(reader.calls) == 3
    for _ in range(100):
        with pytest.raises(BreakerOpenError):
            guarded.read_many(request)
    assert len(reader.calls) == 3  # never asked while open
    clock.now += 0.5
    reader.fail = None
    assert guarded.read_many(request) == [[None]]
    assert state(guarded.breaker) is BreakerState.CLOSED
    assert len(reader.calls) == 4


def test_errors_other_than_unavailability_do_not_count(clock):
    reader = FakeReader()
    guarded = GuardedReader(reader, breaker_on(clock))
    reader.fail = OnlineStoreError("undecodable value")
    for _ in range(5):
        with pytest.raises(OnlineStoreError):
            guarded.read_many([(restaurant_orders, ["r001"])])
    assert state(guarded.breaker) is BreakerState.CLOSED
