"""Parking and run tokens: the same behaviour in memory and in Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from taskthrottle import _deferrals
from taskthrottle._deferrals import (
    OWNED,
    RELEASED,
    Deferrals,
    MemoryDeferrals,
    Parked,
    ParkRefused,
    RedisDeferrals,
    Releaser,
    Unreadable,
)
from taskthrottle.testing import ManualClock
from tests.faults.servers import RedisServer


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
    assert deferrals.claim(lead=2, batch=10, hold=30).parked == []
    clock.advance(25)
    claimed = deferrals.claim(lead=6, batch=10, hold=30).parked
    assert [(p.task_id, p.due_in, p.payload) for p in claimed] == [
        ("a", 0.0, b"first"),
        ("b", 5.0, b"second"),
    ]
    for parked in claimed:
        deferrals.done(parked.task_id)
    clock.advance(100)
    assert [p.task_id for p in deferrals.claim(lead=0, batch=10, hold=30).parked] == ["c"]


def test_a_crashed_claim_is_taken_over(deferrals: Deferrals, clock: ManualClock) -> None:
    """A claim never marked done is claimed again after its hold: parked tasks survive."""
    deferrals.park("a", 1, b"x")
    clock.advance(1)
    assert len(deferrals.claim(lead=0, batch=10, hold=30).parked) == 1
    assert deferrals.claim(lead=0, batch=10, hold=30).parked == []  # held by the first claimer
    clock.advance(31)
    assert [p.task_id for p in deferrals.claim(lead=0, batch=10, hold=30).parked] == ["a"]


def test_the_batch_bounds_a_claim(deferrals: Deferrals, clock: ManualClock) -> None:
    """No claim takes more than its batch."""
    for i in range(5):
        deferrals.park(f"t{i}", 1, b"x")
    clock.advance(1)
    assert len(deferrals.claim(lead=0, batch=3, hold=30).parked) == 3
    assert len(deferrals.claim(lead=0, batch=3, hold=30).parked) == 2


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


def test_a_copy_published_while_the_store_failed_may_run(deferrals: Deferrals) -> None:
    """A copy whose deferral the store could not record carries the token of the copy that
    made it: it runs, once, and so does nothing else."""
    assert deferrals.expect("t", "one")
    assert deferrals.begin("t", "one")  # this copy is refused again; the store is down
    assert deferrals.begin("t", "two", prior="one")  # its copy, never expected
    assert not deferrals.begin("t", "three", prior="one")  # a second such copy
    assert deferrals.begin("t", "two", prior="one")  # the same copy redelivered


def test_a_delivery_run_where_it_is_makes_what_its_failed_park_left_stale(
    deferrals: Deferrals, clock: ManualClock
) -> None:
    """A park that failed on the way back (the reply was lost) may have parked the task all
    the same: once the held delivery owns the task, the parked copy is neither published
    nor run, and the original may still run again after a crash."""
    deferrals.park("t", 1, b"x")  # done, though the caller saw an error
    assert deferrals.own("t", None)
    clock.advance(2)
    assert deferrals.claim(lead=0, batch=10, hold=30).parked == []
    assert not deferrals.expect("t", "released", prior=RELEASED)  # claimed it already
    assert deferrals.begin("t", None) == OWNED  # the held original, delivered again
    assert deferrals.expect("t", "again")  # ... or requeued, and handing itself back
    assert deferrals.begin("t", "again")


def test_a_delivery_run_where_it_is_makes_what_its_failed_publish_left_stale(
    deferrals: Deferrals,
) -> None:
    """A publish that failed on the way back may have published the copy all the same;
    that copy never runs once the delivery that made it owns the task. What the delivery
    hands back later names it as their maker, and runs once."""
    assert deferrals.expect("t", "p")
    assert deferrals.begin("t", "p")
    assert deferrals.own("t", "p")
    assert not deferrals.begin("t", "escaped", prior="p")
    assert deferrals.begin("t", "p") == OWNED  # the held copy, delivered again
    assert deferrals.begin("t", "later", prior="body:p")  # handed back; expect failed
    assert not deferrals.begin("t", "again", prior="body:p")


def test_a_copy_that_started_first_wins_over_the_held_delivery(deferrals: Deferrals) -> None:
    """If the copy a failed park left behind was published and started before the held
    delivery could own the task, the held delivery must not run."""
    deferrals.park("t", 0, b"x")
    assert deferrals.expect("t", "released", prior=RELEASED)
    assert deferrals.begin("t", "released")
    assert not deferrals.own("t", None)
    assert deferrals.own("t", "released")  # that copy may itself be held later


def test_a_claim_counts_what_is_parked(deferrals: Deferrals, clock: ManualClock) -> None:
    """A claim says how many tasks remain parked or claimed, and that nothing vanished."""
    deferrals.park("a", 1, b"x")
    deferrals.park("b", 60, b"y")
    clock.advance(1)
    claim = deferrals.claim(lead=0, batch=10, hold=30)
    assert ([p.task_id for p in claim.parked], claim.remaining, claim.intact) == (["a"], 2, True)
    deferrals.done("a")
    assert deferrals.claim(lead=0, batch=10, hold=30).remaining == 1


def test_vanished_parked_tasks_are_reported_once(
    redis_url: str, namespace: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """When the parking keys disappear (a restart, FLUSHALL, eviction), the releaser says so
    once at ERROR, with how many tasks it last knew were parked."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deferrals = RedisDeferrals(client, "{" + namespace + "}", clock)
    for i in range(3):
        deferrals.park(f"t{i}", 60, b"x")
    releaser = Releaser(deferrals, lead=0)
    assert releaser.release(lambda item, token: None) == 0
    client.delete(*client.keys("{" + namespace + "}:park:*"))  # our keys only
    with caplog.at_level("ERROR", logger="taskthrottle"):
        releaser.release(lambda item, token: None)
        releaser.release(lambda item, token: None)
    vanished = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    assert len(vanished) == 1 and "3 were parked" in vanished[0]


def test_every_parking_key_expires(redis_url: str, namespace: str, clock: ManualClock) -> None:
    """Parked tasks, claims, run keys and the epoch all carry a TTL."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deferrals = RedisDeferrals(client, "{" + namespace + "}", clock)
    deferrals.park("a", 1, b"x")
    deferrals.park("b", 60, b"y")
    clock.advance(1)
    assert deferrals.claim(lead=0, batch=10, hold=30).parked
    deferrals.begin("c", "tok", prior="gone")  # a run key made by begin alone
    keys = client.keys("{" + namespace + "}:*")
    assert len(keys) >= 6
    assert all(client.pttl(key) > 0 for key in keys), {k: client.pttl(k) for k in keys}


def test_a_bad_parked_task_is_set_aside_and_the_others_published(
    deferrals: Deferrals, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A parked task its releaser cannot read is set aside, logged once, and never blocks
    the tasks claimed with it."""
    for name in ("a", "bad", "c"):
        deferrals.park(name, 1, name.encode())
    clock.advance(1)
    published: list[str] = []

    def publish(item: Parked, token: str) -> None:
        if item.payload == b"bad":
            raise Unreadable("not a task")
        published.append(item.task_id)

    with caplog.at_level("ERROR", logger="taskthrottle"):
        assert Releaser(deferrals, lead=0).release(publish) == 2
        clock.advance(60)
        assert Releaser(deferrals, lead=0).release(publish) == 0
    assert published == ["a", "c"]
    assert [r.getMessage() for r in caplog.records] == [
        "taskthrottle: parked task bad set aside: not a task"
    ]
    assert deferrals.claim(lead=0, batch=10, hold=30).remaining == 0


def test_parking_is_bounded(deferrals: Deferrals, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the most tasks parked, or the largest payload, parking is refused (the task then
    waits in the broker) and nothing is written."""
    monkeypatch.setattr(_deferrals, "MAX_PARKED", 2)
    deferrals.park("a", 60, b"x")
    deferrals.park("b", 60, b"x")
    with pytest.raises(ParkRefused, match="2 tasks are parked"):
        deferrals.park("c", 60, b"x")
    deferrals.park("a", 30, b"y")  # parking a parked task again is no new task
    with pytest.raises(ParkRefused, match="bytes"):
        deferrals.park("d", 60, b"x" * (_deferrals.MAX_PARKED_BYTES + 1))
    assert deferrals.begin("c", None) and deferrals.begin("d", None)  # no run keys made


def test_each_app_releases_its_own_parked_tasks(
    redis_url: str, namespace: str, clock: ManualClock
) -> None:
    """Two apps parking under one namespace never see each other's parked tasks."""
    import redis

    client = redis.Redis.from_url(redis_url)
    billing = RedisDeferrals(client, "{" + namespace + "}", clock, app="billing")
    other = RedisDeferrals(client, "{" + namespace + "}", clock, app="other")
    billing.park("charge", 1, b"charge_card(100)")
    clock.advance(1)
    assert other.claim(lead=0, batch=10, hold=30).parked == []
    assert [p.task_id for p in billing.claim(lead=0, batch=10, hold=30).parked] == ["charge"]


def test_a_parking_redis_that_can_lose_tasks_is_named_once(
    servers: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """At start a worker says, in one WARNING line each, when the parking Redis keeps
    nothing on disk or may evict, naming the setting to change; nothing when it persists
    and never evicts. (Redis-servers of the test's own: CONFIG SET is server-wide.)"""
    volatile, durable = servers("volatile"), servers("durable", aof=True)
    volatile.client().config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level("WARNING", logger="taskthrottle"):
        RedisDeferrals(durable.client(), "{ns}").warn_if_volatile()
        assert caplog.records == []
        RedisDeferrals(volatile.client(), "{ns}").warn_if_volatile()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "keeps nothing on disk" in lines[0] and "enable appendonly" in lines[0]
    assert "allkeys-lru" in lines[1] and "noeviction" in lines[1]
    assert all("park_url" in line for line in lines)
