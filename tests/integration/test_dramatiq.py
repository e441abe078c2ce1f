"""Real dramatiq workers (2 processes x 2 threads) hold one limit across the fleet."""

from __future__ import annotations

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
    return fleet.client("tests.integration.dramatiq_app", monkeypatch)


def run_at_the_limit(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    fleet.start_dramatiq("tests.integration.dramatiq_app", "workers")
    module = client_app(fleet, monkeypatch)
    messages = [module.limited.send(i) for i in range(TASKS)]
    results = [m.get_result(block=True, timeout=120_000) for m in messages]
    assert results == [2 * i for i in range(TASKS)]

    rows = journal(redis_url, fleet.env["TT_NS"])
    starts = sorted((when, mid, extra) for kind, mid, when, extra in rows if kind == "start")
    assert sorted(mid for _, mid, _ in starts) == sorted(m.message_id for m in messages)
    assert all(extra == "retries=0" for _, _, extra in starts), "no retry count grew"
    times = [when for when, _, _ in starts]
    busiest = most_in_any_second(times)
    steady = times[RATE:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    deliveries = Counter(mid for kind, mid, _, _ in rows if kind == "delivery")
    extra = (sum(deliveries.values()) - TASKS) / TASKS
    print(f"busiest second {busiest}, {rate:.2f}/s steady, {extra:.2f} extra deliveries each")
    assert busiest <= RATE + RATE
    assert abs(rate - RATE) <= 0.05 * RATE, f"start rate {rate:.2f}/s"
    assert extra <= 1.1


def test_dramatiq_on_the_redis_broker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """400 messages at 20/s over 2 processes x 2 threads: once each, on time, in the limit."""
    run_at_the_limit(fleet(TT_RATE=str(RATE)), monkeypatch, redis_url)


@pytest.mark.skipif(not rabbit_answers(), reason="no RabbitMQ answers on 127.0.0.1:5672")
def test_dramatiq_on_the_rabbitmq_broker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """The same with RabbitMQ as the broker (results and limits in Redis)."""
    run_at_the_limit(fleet(TT_RATE=str(RATE), TT_BROKER="rabbitmq"), monkeypatch, redis_url)


def test_ten_thousand_waiting_messages_leave_worker_memory_flat(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Messages whose turns are far away wait parked in Redis, not in the worker."""
    workers = fleet(TT_SLOW_RATE="0.01")  # one turn per 100 s: all but a few stay parked
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers", processes=1)
    module = client_app(workers, monkeypatch)
    client = redis.Redis.from_url(redis_url)
    ns = workers.env["TT_NS"]

    def parked() -> int:
        count: Any = client.zcard(f"{{{ns}}}:park:dramatiq.{ns}-dramatiq:due")
        return int(count)

    for i in range(500):
        module.far.send(i)
    wait_for(lambda: parked() >= 495, 60, "the first 500 messages to be parked")
    before = rss_kb(workers.procs[0].pid)
    for i in range(9_500):
        module.far.send(i)
    wait_for(lambda: parked() >= 9_990, 240, "10,000 messages to be parked")
    after = rss_kb(workers.procs[0].pid)
    print(f"worker RSS {before} KiB with 500 waiting, {after} KiB with {parked()} waiting")
    assert after - before < 40 * 1024, f"worker memory grew by {(after - before) // 1024} MiB"


def kill_the_holder(fleet: Fleet, redis_url: str, message_id: str) -> None:
    kill_runner(redis_url, fleet.env["TT_NS"], message_id)
    for proc in fleet.procs:  # dramatiq shuts the whole worker down when one process dies
        proc.wait(timeout=60)


def test_a_killed_holders_slot_comes_back_after_the_lease_ttl(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-message: the dead holder's slot expires with its lease TTL (2 s), long
    before Redis would hand the message back (60 s), and the next message runs."""
    marker = tmp_path / "hanging"
    workers = fleet(TT_LEASE_TTL="2", TT_HANG_MARKER=str(marker))
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers", processes=1)
    module = client_app(workers, monkeypatch)
    hanging = module.guarded.send(1)
    wait_for(marker.exists, 30, "the first message to start")
    kill_the_holder(workers, redis_url, hanging.message_id)
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers-again", processes=1)
    assert module.guarded.send(2).get_result(block=True, timeout=30_000) == 2


def test_a_message_whose_worker_was_killed_is_not_lost(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-message: Redis hands the message back to a live worker, and it completes."""
    marker = tmp_path / "hanging"
    workers = fleet(TT_HEARTBEAT="1000", TT_MAINTENANCE="1000000", TT_HANG_MARKER=str(marker))
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers", processes=1)
    module = client_app(workers, monkeypatch)
    hanging = module.guarded.send(7)
    wait_for(marker.exists, 30, "the message to start")
    kill_the_holder(workers, redis_url, hanging.message_id)
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers-again", processes=1)
    assert hanging.get_result(block=True, timeout=60_000) == 7
    starts = [r for r in journal(redis_url, workers.env["TT_NS"]) if r[0] == "start"]
    assert sum(1 for r in starts if r[1] == hanging.message_id) == 2
