"""Celery's own features keep their meaning when throttled tasks are deferred (real worker,
prefork 2, Redis broker). The limit is 2 a second with a burst of 1, per feature key, so all
but the first task of each feature wait for their turn at least once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from tests.helpers import journal, wait_for
from tests.integration.conftest import Fleet

APP = "tests.integration.celery_app"
LIMITS = {"TT_RATE": "2", "TT_BURST": "1"}

Row = tuple[str, str, float, str]


def client_app(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Any:
    return fleet.client(APP, monkeypatch)


def rows_of(kind: str, rows: Iterable[Row]) -> list[tuple[str, str]]:
    """(task id, extra) of the journal's rows of one kind."""
    return [(task_id, extra) for k, task_id, _, extra in rows if k == kind]


def deliveries(rows: Iterable[Row]) -> Counter[str]:
    """How many times each task passed the gate (deferred deliveries included)."""
    return Counter(task_id for kind, task_id, _, _ in rows if kind == "delivery")


def assert_mostly_deferred(rows: list[Row], ids: list[str], what: str) -> None:
    """The premise of each check: all but the first task waited for its turn at least once."""
    counts = deliveries(rows)
    deferred = [i for i in ids if counts[i] >= 2]
    assert len(deferred) >= len(ids) - 1, f"{what}: only {len(deferred)} of {len(ids)} deferred"


def test_canvas_callbacks_and_handlers_survive_deferrals(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """group: every result, in order; chord: the callback runs once with every header
    result; link / link_error: once each, for the success and for the failure; a task class's
    on_success / on_failure / after_return: once per task, not once per deferral."""
    from celery import chord, group

    workers = fleet(**LIMITS)
    workers.start(APP, "node1")
    m = client_app(workers, monkeypatch)
    ns = workers.env["TT_NS"]

    grouped = group(m.work.s("group", i) for i in range(5)).apply_async()
    chorded = chord((m.work.s("chord", i) for i in range(5)), m.collect.s()).apply_async()
    links = {"link": m.linked.s(), "link_error": m.errlinked.s()}
    fillers = [m.work.delay("link", i) for i in range(2)]  # so that the next two wait
    ok = m.work.apply_async(("link", 10), **links)
    bad = m.work.apply_async(("link", 11, True), **links)
    handled = [m.handled.delay("handled", i) for i in range(4)]
    handled_bad = m.handled.delay("handled", 4, True)

    assert grouped.get(timeout=60) == [0, 2, 4, 6, 8]
    assert chorded.get(timeout=60) == [0, 2, 4, 6, 8]
    assert [f.get(timeout=60) for f in fillers] == [0, 2]
    assert ok.get(timeout=60) == 20
    with pytest.raises(ValueError, match="fails on purpose"):
        bad.get(timeout=60)
    assert [h.get(timeout=60) for h in handled] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="fails on purpose"):
        handled_bad.get(timeout=60)
    handled_ids = [h.id for h in [*handled, handled_bad]]

    def recorded(kind: str, count: int) -> Callable[[], bool]:
        return lambda: len(rows_of(kind, journal(redis_url, ns))) >= count

    # The callbacks and handlers run after the result is stored.
    wait_for(recorded("after_return", len(handled_ids)), 30, "the after_return handlers")
    wait_for(recorded("linked", 1), 30, "the link callback")
    wait_for(recorded("errlinked", 1), 30, "the link_error callback")
    rows = journal(redis_url, ns)
    group_ids = [r.id for r in grouped.results]
    header_ids = [r.id for r in chorded.parent.results]
    assert_mostly_deferred(rows, group_ids, "group")
    assert_mostly_deferred(rows, header_ids, "chord header")
    assert_mostly_deferred(rows, [ok.id, bad.id], "linked tasks")
    assert_mostly_deferred(rows, handled_ids, "handled tasks")

    starts = Counter(task_id for task_id, _ in rows_of("start", rows))
    every = [*group_ids, *header_ids, *(f.id for f in fillers), ok.id, bad.id, *handled_ids]
    assert {i: starts[i] for i in every} == dict.fromkeys(every, 1), "each body ran once"

    # chord: the callback ran once, with every header result, in order.
    assert [extra for _, extra in rows_of("chord", rows)] == ["0,2,4,6,8"]
    assert chorded.parent.get(timeout=10) == [0, 2, 4, 6, 8]

    # link and link_error: once each, for the task that succeeded / failed.
    assert rows_of("linked", rows) == [(ok.id, "20")]
    assert rows_of("errlinked", rows) == [(bad.id, "ValueError")]

    # The task class's handlers: once per task, with its outcome.
    assert sorted(rows_of("on_success", rows)) == sorted(
        (h.id, str(2 * n)) for n, h in enumerate(handled)
    )
    assert rows_of("on_failure", rows) == [(handled_bad.id, "ValueError")]
    assert sorted(rows_of("after_return", rows)) == sorted(
        [*((h.id, "SUCCESS") for h in handled), (handled_bad.id, "FAILURE")]
    )


def test_expires_revoke_time_limits_and_routing_survive_deferrals(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """``expires`` and ``revoke`` end a waiting task REVOKED without running its body (both
    while it waits as a countdown copy and while it is parked); ``soft_time_limit`` counts
    from the body's turn, not from the wait; a task sent to another queue is deferred
    through that queue, with its priority."""
    workers = fleet(**LIMITS)
    queue = workers.env["TT_QUEUE"]
    other = f"{queue}-other"
    workers.start(APP, "node1", "-Q", f"{queue},{other}")
    m = client_app(workers, monkeypatch)
    ns = workers.env["TT_NS"]

    # One key, turns 0.5 s apart: positions 8 and 9 wait ~4 s as countdown copies, 13 and
    # 14 wait ~7 s, parked (park_after is 5 s). Those to expire do so after 3 s.
    revoking, expiring = {8, 13}, {9, 14}
    waiting = [
        m.work.apply_async(("wait", i), expires=3 if i in expiring else 60) for i in range(15)
    ]
    # Turns 0, 0.5, 1 s for bodies that run into a 0.5 s soft time limit.
    holds = [m.hold.apply_async(("soft", i), soft_time_limit=0.5) for i in range(3)]
    routed = [m.work.apply_async(("route", i), queue=other, priority=7) for i in range(4)]

    def deferred_once(task_id: str) -> Callable[[], bool]:
        def check() -> bool:
            rows = journal(redis_url, ns)
            return any(k == "postrun" and t == task_id and e == "IGNORED" for k, t, _, e in rows)

        return check

    def revoked(result: Any) -> Callable[[], bool]:
        return lambda: bool(result.state == "REVOKED")

    for i in sorted(revoking):  # revoked while it waits for its turn
        wait_for(deferred_once(waiting[i].id), 30, f"task {i} to be deferred")
        waiting[i].revoke()

    for i, result in enumerate(waiting):
        if i in expiring | revoking:
            wait_for(revoked(result), 60, f"task {i} to end REVOKED")
        else:
            assert result.get(timeout=60) == 2 * i
    assert [h.get(timeout=60) for h in holds] == [0, 1, 2]
    assert [r.get(timeout=60) for r in routed] == [0, 2, 4, 6]

    rows = journal(redis_url, ns)
    counts = deliveries(rows)
    starts = Counter(task_id for task_id, _ in rows_of("start", rows))
    for i, result in enumerate(waiting):
        if i in expiring | revoking:
            assert counts[result.id] >= 1, f"task {i} was deferred before it ended"
            assert starts[result.id] == 0, f"the body of revoked task {i} ran"
        else:
            assert starts[result.id] == 1, f"task {i} ran {starts[result.id]} times"
    assert_mostly_deferred(rows, [r.id for r in waiting if r.state != "REVOKED"], "waiting")

    # Soft time limit: each body began, then was interrupted by SoftTimeLimitExceeded.
    ids = [h.id for h in holds]
    assert_mostly_deferred(rows, ids, "soft time limit tasks")
    assert sorted(t for t, _ in rows_of("begun", rows)) == sorted(ids)
    assert sorted(t for t, _ in rows_of("soft", rows)) == sorted(ids)
    first_seen = {t: w for k, t, w, _ in reversed(rows) if k == "delivery"}
    began = {t: w for k, t, w, _ in rows if k == "begun"}
    waits = [began[i] - first_seen[i] for i in ids]
    assert max(waits) > 0.5, f"no task waited longer than its soft time limit: {waits}"

    # Routing: every routed task ran from the other queue, deferred on the way, with its
    # priority (Redis orders priorities only within what one fetch sees: order not checked).
    assert_mostly_deferred(rows, [r.id for r in routed], "routed tasks")
    where = dict(rows_of("start", rows))
    assert {r.id: where[r.id] for r in routed} == {
        r.id: f"key=route queue={other} priority=7" for r in routed
    }
