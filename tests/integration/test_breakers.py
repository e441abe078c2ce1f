"""Real Celery and Dramatiq workers behind one breaker: the callee fails, the breaker
opens, tasks wait (none lost, none failed) and complete once the callee recovers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.helpers import journal, wait_for
from tests.integration.conftest import Fleet

TASKS = 20


def outage_then_recovery(
    fleet: Fleet, module: Any, redis_url: str, send: Callable[[int], Any]
) -> list[Any]:
    """Take the callee down, send the tasks, wait until the breaker has opened and tasks
    have been turned back by it, then bring the callee back."""
    ns = fleet.env["TT_NS"]
    client = redis.Redis.from_url(redis_url)
    client.set(f"{ns}:callee-down", 1, ex=300)
    sent = [send(i) for i in range(TASKS)]
    wait_for(lambda: module.CALLEE.state().state != "closed", 30, "the breaker to open")

    def turned_back() -> int:
        rows = journal(redis_url, ns)
        return sum(k == "delivery" for k, *_ in rows) - sum(k == "start" for k, *_ in rows)

    wait_for(lambda: turned_back() >= TASKS, 60, "deliveries turned back by the breaker")
    client.delete(f"{ns}:callee-down")
    return sent


def check_journal(redis_url: str, ns: str, ids: list[str], retries: Counter[str]) -> None:
    """Every task's callee call succeeded once; every retry follows a real callee failure
    (a refusal by the breaker never counts as one); few calls reached the failing callee."""
    rows = journal(redis_url, ns)
    done = Counter(mid for kind, mid, _, _ in rows if kind == "done")
    failed = Counter(mid for kind, mid, _, _ in rows if kind == "failed")
    assert done == {i: 1 for i in ids}
    assert retries == failed
    deliveries = sum(kind == "delivery" for kind, *_ in rows)
    print(f"{sum(failed.values())} calls failed, {deliveries} deliveries for {TASKS} tasks")
    # Closed, 3 failures open it; each half-open round (1 s) lets one probe fail: not one
    # failed call per delivery.
    assert sum(failed.values()) < deliveries / 2


def test_celery_tasks_wait_for_the_breaker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Two prefork processes; the callee is down, then back: all 20 tasks succeed."""
    workers = fleet()
    workers.start("tests.integration.celery_app", "node1")
    module = workers.client("tests.integration.celery_app", monkeypatch)
    results = outage_then_recovery(workers, module, redis_url, module.via_breaker.delay)
    assert [r.get(timeout=60) for r in results] == list(range(TASKS))
    assert {r.state for r in results} == {"SUCCESS"}
    rows = journal(redis_url, workers.env["TT_NS"])
    last = {}
    for kind, mid, _, extra in rows:
        if kind == "start":
            last[mid] = int(extra.removeprefix("retries="))
    check_journal(redis_url, workers.env["TT_NS"], [r.id for r in results], Counter(last))


def test_dramatiq_messages_wait_for_the_breaker(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Two processes x two threads; the callee is down, then back: all 20 messages succeed."""
    workers = fleet()
    workers.start_dramatiq("tests.integration.dramatiq_app", "workers")
    module = workers.client("tests.integration.dramatiq_app", monkeypatch)
    messages = outage_then_recovery(workers, module, redis_url, module.via_breaker.send)
    assert [m.get_result(block=True, timeout=60_000) for m in messages] == list(range(TASKS))
    rows = journal(redis_url, workers.env["TT_NS"])
    last = {}
    for kind, mid, _, extra in rows:
        if kind == "start":
            last[mid] = int(extra.removeprefix("retries="))
    check_journal(redis_url, workers.env["TT_NS"], [m.message_id for m in messages], Counter(last))
