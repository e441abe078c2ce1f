"""Parking and run tokens: the same behaviour in memory and in Redis."""

from __future__ import annotations

import pytest

from taskthrottle._deferrals import Deferrals, MemoryDeferrals, RedisDeferrals
from taskthrottle.testing import ManualClock


@pytest.fixture(params=["memory", "redis"])
def deferrals(request: pytest.FixtureRequest, clock: ManualClock) -> Deferrals:
    if request.param == "memory":
        return MemoryDeferrals(clock)
    import redis

    url = request.getfixturevalue("redis_url")
    ns = request.getfixturevalue("namespace")
    return RedisDeferrals(redis.Redis.from_url(url), "{" + ns + "}", clock)


def test_parked_tasks_come_out_in_due_order_within_the_lead(
    deferrals: Deferrals, clock: ManualClock
) -> None:
    """Only tasks due within the lead are claimed, each with the time left to its turn."""
    deferrals.park("b", 30, b"second")
    deferrals.park("a", 10, b"first")
    deferrals.park("c", 100, b"third")
    assert deferrals.claim(lead=2, batch=10, hold=30) == []
    clock.advance(25)
    claimed = deferrals.claim(lead=6, batch=10, hold=30)
    assert [(p.task_id, p.due_in, p.payload) for p in claimed] == [
        ("a", 0.0, b"first"),
        ("b", 5.0, b"second"),
    ]
    for parked in claimed:
        deferrals.done(parked.task_id)
    clock.advance(100)
    assert [p.task_id for p in deferrals.claim(lead=0, batch=10, hold=30)] == ["c"]


def test_a_crashed_claim_is_taken_over(deferrals: Deferrals, clock: ManualClock) -> None:
    """A claim never marked done is claimed again after its hold: parked tasks survive."""
    deferrals.park("a", 1, b"x")
    clock.advance(1)
    assert len(deferrals.claim(lead=0, batch=10, hold=30)) == 1
    assert deferrals.claim(lead=0, batch=10, hold=30) == []  # held by the first claimer
    clock.advance(31)
    assert [p.task_id for p in deferrals.claim(lead=0, batch=10, hold=30)] == ["a"]


def test_the_batch_bounds_a_claim(deferrals: Deferrals, clock: ManualClock) -> None:
    """No claim takes more than its batch."""
    for i in range(5):
        deferrals.park(f"t{i}", 1, b"x")
    clock.advance(1)
    assert len(deferrals.claim(lead=0, batch=3, hold=30)) == 3
    assert len(deferrals.claim(lead=0, batch=3, hold=30)) == 2


def test_only_the_expected_copy_runs(deferrals: Deferrals) -> None:
    """After a deferral the original is stale; of two published copies only the latest runs;
    a copy that ran may run again (an acks_late redelivery); no copy runs after it."""
    assert deferrals.begin("t", None)  # a task never deferred
    assert deferrals.expect("t", "one")
    assert not deferrals.begin("t", None)  # the original, redelivered
    assert deferrals.expect("t", "two")  # a taken-over claim published another copy
    assert not deferrals.begin("t", "one")
    assert deferrals.begin("t", "two")
    assert deferrals.begin("t", "two")  # the same copy redelivered after a crash
    assert not deferrals.expect("t", "three")  # the task ran: publish no more copies
    assert not deferrals.begin("t", "three")


def test_parking_makes_the_original_stale(deferrals: Deferrals) -> None:
    """Once parked, a redelivered original must not run."""
    deferrals.park("t", 60, b"x")
    assert not deferrals.begin("t", None)


def test_a_copy_may_hand_itself_back_again(deferrals: Deferrals) -> None:
    """A copy that began and is refused again (a full concurrency limit) defers itself once
    more: its new copy may run, and no other may."""
    assert deferrals.expect("t", "one")
    assert deferrals.begin("t", "one")
    assert deferrals.expect("t", "two", prior="one")
    assert not deferrals.begin("t", "one")
    assert deferrals.begin("t", "two")
    assert not deferrals.expect("t", "three", prior="one")  # not the one that ran last
