"""Real Celery workers (prefork, two nodes) hold one limit across the fleet."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import journal, kill_runner, most_in_any_second, rss_kb, wait_for
from tests.integration.conftest import Fleet, rabbit_answers

TASKS = 400
RATE = 20


def client_app(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Any:
    return fleet.client("tests.integration.celery_app", monkeypatch)


def run_fleet_at_the_limit(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    fleet.start("tests.integration.celery_app", "node1")
    fleet.start("tests.integration.celery_app", "node2")
    module = client_app(fleet, monkeypatch)
    results = [module.limited.delay(i) for i in range(TASKS)]
    assert [r.get(timeout=120) for r in results] == [2 * i for i in range(TASKS)]

    rows = journal(redis_url, fleet.env["TT_NS"])
    starts = sorted(
        (when, task_id, extra) for kind, task_id, when, extra in rows if kind == "start"
    )
    ids = [task_id for _, task_id, _ in starts]
    assert sorted(ids) == sorted(r.id for r in results), "every task ran exactly once"
    assert all(extra == "retries=0" for _, _, extra in starts), "no retry count grew"

    times = [when for when, _, _ in starts]
    assert most_in_any_second(times) <= RATE + RATE  # the limit plus its burst
    steady = times[RATE:]  # after the initial burst
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert abs(rate - RATE) <= 0.05 * RATE, f"start rate {rate:.2f}/s"

    deliveries = Counter(task_id for kind, task_id, _, _ in rows if kind == "delivery")
    extra = (sum(deliveries.values()) - TASKS) / TASKS
    busiest = most_in_any_second(times)
    print(f"busiest second {busiest}, {rate:.2f}/s steady, {extra:.2f} extra deliveries per task")
    assert extra <= 1.1, f"{extra:.2f} extra deliveries per task"


def test_two_nodes_on_the_redis_broker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """400 tasks at 20/s over 2 nodes x 2 processes: once each, on time, within the limit."""
    run_fleet_at_the_limit(fleet(TT_RATE=str(RATE)), monkeypatch, redis_url)


@pytest.mark.skipif(not rabbit_answers(), reason="no RabbitMQ answers on 127.0.0.1:5672")
def test_two_nodes_on_the_rabbitmq_broker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """The same workload with RabbitMQ as the broker (results and limits in Redis)."""
    broker = os.environ.get("TT_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672//")
    run_fleet_at_the_limit(fleet(broker, TT_RATE=str(RATE)), monkeypatch, redis_url)


def test_adjust_through_current_lease(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A task adjusts its own lease; the adjustment lands in the shared bucket."""
    workers = fleet()
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    sent = time.monotonic()
    assert module.llm.delay("acme", 1000).get(timeout=30) == {"tpm": 1500.0}
    limiter = module.app.taskthrottle.limiter()
    left = limiter.available("tenant:acme", [module.Limit.per_minute("tpm", 60_000)])
    refilled = 1000 * (time.monotonic() - sent)  # the bucket refills 1,000 a second
    assert 58_500 <= left["tpm"] <= 58_500 + refilled  # 1,500 spent, some refilled since


def test_ten_thousand_waiting_tasks_leave_worker_memory_flat(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Tasks whose turns are far away are parked in Redis, not held by the worker."""
    workers = fleet(TT_SLOW_RATE="0.01")  # one turn per 100 s: all but a few stay parked
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    ns = workers.env["TT_NS"]
    client = redis.Redis.from_url(redis_url)

    def parked() -> int:
        count: Any = client.zcard(f"{{{ns}}}:park:celery.tt_test:due")
        return int(count)

    for i in range(500):
        module.far.delay(i)
    wait_for(lambda: parked() >= 495, 60, "the first 500 tasks to be parked")
    before = rss_kb(workers.procs[0].pid)
    for i in range(9_500):
        module.far.delay(i)
    wait_for(lambda: parked() >= 9_990, 240, "10,000 tasks to be parked")
    after = rss_kb(workers.procs[0].pid)
    print(f"worker RSS {before} KiB with 500 waiting, {after} KiB with {parked()} waiting")
    # Held as ETA messages, each waiting task would cost the worker its request and body.
    assert after - before < 40 * 1024, f"worker memory grew by {(after - before) // 1024} MiB"
    scheduled = module.app.control.inspect(timeout=2).scheduled() or {}
    assert sum(len(held) for held in scheduled.values()) < 10  # no ETA tasks held


def test_a_wait_longer_than_the_visibility_timeout_runs_once(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A turn 10 s away with a 3 s visibility timeout: parked, released, run exactly once."""
    workers = fleet(TT_SLOW_RATE="0.1", TT_VISIBILITY="3")
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    first, second = module.far.delay(1), module.far.delay(2)
    assert (first.get(timeout=30), second.get(timeout=60)) == (1, 2)
    rows = journal(redis_url, workers.env["TT_NS"])
    starts = Counter(task_id for kind, task_id, _, _ in rows if kind == "start")
    assert starts == {first.id: 1, second.id: 1}
    deliveries = Counter(task_id for kind, task_id, _, _ in rows if kind == "delivery")
    # Whichever took the second turn was delivered twice: the original, the released copy.
    assert sorted(deliveries.values()) == [1, 2]


def test_a_crash_between_republish_and_ack_runs_the_task_once(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """acks_late: the worker dies after publishing the deferred copy, before acknowledging
    the original; the redelivered original is recognised as stale and dropped."""
    marker = tmp_path / "crashed"
    workers = fleet(TT_RATE="1", TT_BURST="1", TT_ACKS_LATE="1", TT_CRASH_AFTER_DEFER=str(marker))
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    results = [module.limited.delay(i) for i in range(3)]
    assert [r.get(timeout=60) for r in results] == [0, 2, 4]
    assert marker.exists(), "the worker process did crash once"
    rows = journal(redis_url, workers.env["TT_NS"])
    starts = Counter(task_id for kind, task_id, _, _ in rows if kind == "start")
    assert starts == {r.id: 1 for r in results}


def test_failures_release_slots_and_refund(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A task that raises frees its concurrency slot; with on_failure="refund" its tokens
    come back too, so only the successes stay spent."""
    workers = fleet(TT_ON_FAILURE="refund")
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    calls = [module.guarded.delay(1, fail=True), module.guarded.delay(2), module.guarded.delay(3)]
    with pytest.raises(ValueError, match="fails on purpose"):
        calls[0].get(timeout=30)
    assert [c.get(timeout=30) for c in calls[1:]] == [2, 3]
    limiter = module.app.taskthrottle.limiter()
    left = limiter.available("guarded", [module.Limit.per_day("tpd", 60_000)])
    assert 59_800 <= left["tpd"] < 59_850  # two successes of 100 spent; the failure refunded
    assert limiter.available("guarded", [module.Limit.concurrency("concurrency", 1)]) == {
        "concurrency": 1.0
    }


def test_a_killed_holders_slot_comes_back_after_the_lease_ttl(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-task: the next task waits for the dead holder's slot to expire, then runs."""
    marker = tmp_path / "hanging"
    workers = fleet(TT_LEASE_TTL="3", TT_HANG_MARKER=str(marker))
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    hanging = module.guarded.delay(1)
    wait_for(marker.exists, 30, "the first task to start")
    kill_runner(redis_url, workers.env["TT_NS"], hanging.id)
    killed_at = time.time()
    assert module.guarded.delay(2).get(timeout=60) == 2
    rows = journal(redis_url, workers.env["TT_NS"])
    (second,) = [
        when for kind, task_id, when, _ in rows if kind == "start" and task_id != hanging.id
    ]
    assert second > killed_at  # it had to wait for the slot


def test_a_refused_republish_loses_nothing(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """acks_late: the broker refuses the deferred copy once; the original goes back to the
    queue, comes round again and the task runs exactly once."""
    marker = tmp_path / "refused"
    workers = fleet(TT_RATE="2", TT_BURST="1", TT_ACKS_LATE="1", TT_FAIL_PUBLISH_ONCE=str(marker))
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    results = [module.limited.delay(i) for i in range(3)]
    assert [r.get(timeout=60) for r in results] == [0, 2, 4]
    assert marker.exists(), "a publish was refused"
    rows = journal(redis_url, workers.env["TT_NS"])
    assert Counter(t for kind, t, _, _ in rows if kind == "start") == {r.id: 1 for r in results}


def test_chains_and_callbacks_survive_the_deferral(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A chain of throttled tasks, deferred on the way, still passes its values along,
    and a link callback still runs, once, with the result."""
    from celery import chain

    workers = fleet(TT_RATE="4", TT_BURST="1")
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    flow = chain(module.limited.s(1), module.limited.s(), module.limited.s())
    result = flow.apply_async(link=module.note.s())
    assert result.get(timeout=60) == 8
    wait_for(
        lambda: any(r[0] == "callback" for r in journal(redis_url, workers.env["TT_NS"])),
        30,
        "the callback",
    )
    callbacks = [r for r in journal(redis_url, workers.env["TT_NS"]) if r[0] == "callback"]
    assert [extra for *_, extra in callbacks] == ["8"]


def test_acks_late_redelivers_a_task_whose_worker_was_killed(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-body under acks_late: the task is redelivered and completes."""
    marker = tmp_path / "hanging"
    workers = fleet(TT_ACKS_LATE="1", TT_HANG_MARKER=str(marker))
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    hanging = module.guarded.delay(7)
    wait_for(marker.exists, 30, "the task to start")
    kill_runner(redis_url, workers.env["TT_NS"], hanging.id)
    assert hanging.get(timeout=60) == 7
    rows = journal(redis_url, workers.env["TT_NS"])
    assert sum(1 for r in rows if r[0] == "start" and r[1] == hanging.id) == 2


def test_a_refused_republish_runs_the_task_when_already_acknowledged(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """Without acks_late Celery has acknowledged the message before the gate: when the
    broker refuses the deferred copy, the task runs now rather than being lost."""
    marker = tmp_path / "refused"
    workers = fleet(TT_RATE="2", TT_BURST="1", TT_FAIL_PUBLISH_ONCE=str(marker))
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    results = [module.limited.delay(i) for i in range(3)]
    assert [r.get(timeout=60) for r in results] == [0, 2, 4]
    assert marker.exists(), "a publish was refused"
    rows = journal(redis_url, workers.env["TT_NS"])
    assert Counter(t for kind, t, _, _ in rows if kind == "start") == {r.id: 1 for r in results}


def test_each_retry_is_a_new_attempt_that_pays(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A task that calls self.retry() comes back with the same id (and, after a deferral,
    the same headers); each attempt takes a lease of its own instead of replaying the
    first attempt's grant for free."""
    workers = fleet(TT_RATE="2", TT_BURST="1")
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    results = [module.retrying.delay(n, 2) for n in range(3)]  # the later ones wait first
    assert [r.get(timeout=60) for r in results] == [0, 1, 2]
    rows = journal(redis_url, workers.env["TT_NS"])
    for result in results:
        leases = [e for k, t, _, e in rows if k == "start" and t == result.id]
        attempts = [lease.removeprefix(f"lease={result.id}:").split(":")[0] for lease in leases]
        assert attempts == ["0", "1", "2"], leases
        assert len(set(leases)) == 3, leases
    starts = sorted(when for kind, _, when, _ in rows if kind == "start")
    assert most_in_any_second(starts) <= 2 + 1  # 9 paid attempts at 2/s, burst 1


def test_a_waiting_task_is_pending_not_started(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """With task_track_started a task waiting for its turn reads PENDING, not STARTED: its
    body has not begun."""
    workers = fleet(TT_TRACK_STARTED="1", TT_SLOW_RATE="0.2")
    workers.start("tests.integration.celery_app", "node1")
    module = client_app(workers, monkeypatch)
    first = module.far.delay(0)
    assert first.get(timeout=30) == 0
    waiting = module.far.delay(1)  # its turn lies 5 s away
    ns = workers.env["TT_NS"]

    def deferred() -> bool:
        rows = journal(redis_url, ns)
        return any(k == "postrun" and t == waiting.id and e == "IGNORED" for k, t, _, e in rows)

    wait_for(deferred, 30, "the waiting task's first delivery to end deferred")
    assert waiting.state == "PENDING"
    assert not any(k == "start" and t == waiting.id for k, t, _, _ in journal(redis_url, ns))
    assert waiting.get(timeout=30) == 1
