"""Dramatiq's own features keep their meaning when throttled messages are deferred (a real
worker: 1 process, 2 threads, RedisBroker). The limit is 2 a second with a burst of 1, per
feature key, so all but the first message of each feature wait for their turn at least once.
The throttled actors have ``max_retries=0``: a deferral that cost a retry would lose them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis

from tests.helpers import journal, wait_for
from tests.integration.conftest import Fleet

APP = "tests.integration.dramatiq_app"
LIMITS = {"TT_RATE": "2", "TT_BURST": "1"}

Row = tuple[str, str, float, str]


def client_app(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Any:
    return fleet.client(APP, monkeypatch)


def rows_of(kind: str, rows: Iterable[Row]) -> list[tuple[str, str]]:
    """(message id, extra) of the journal's rows of one kind."""
    return [(mid, extra) for k, mid, _, extra in rows if k == kind]


def assert_mostly_deferred(rows: list[Row], ids: list[str], what: str) -> None:
    """The premise of each check: all but the first message waited for its turn at least once."""
    counts = Counter(mid for kind, mid, _, _ in rows if kind == "delivery")
    deferred = [i for i in ids if counts[i] >= 2]
    assert len(deferred) >= len(ids) - 1, f"{what}: only {len(deferred)} of {len(ids)} deferred"


def assert_ran_once(rows: list[Row], ids: list[str]) -> None:
    starts = Counter(mid for mid, _ in rows_of("start", rows))
    assert {i: starts[i] for i in ids} == dict.fromkeys(ids, 1), "each message ran once"
    retries = {extra.split()[1] for mid, extra in rows_of("start", rows) if mid in ids}
    assert retries == {"retries=0"}, "no retry was spent"


def result_of(message: Any, seconds: float = 60) -> Any:
    """A message's result, polled (a blocking get_result would outlast redis-py's 5 s
    socket timeout)."""
    from dramatiq.results import ResultMissing

    found: list[Any] = []

    def ready() -> bool:
        try:
            found.append(message.get_result())
        except ResultMissing:
            return False
        return True

    wait_for(ready, seconds, f"the result of {message}")
    return found[0]


def dead_letters(redis_url: str, fleet: Fleet) -> set[str]:
    """The message ids of what the Redis broker dead-lettered on the fleet's queue (its
    dead letters are keyed by an id of each enqueue instead)."""
    key = f"{fleet.env['TT_NS']}-dramatiq:{fleet.env['TT_QUEUE']}.XQ.msgs"
    found: Any = redis.Redis.from_url(redis_url).hvals(key)
    return {json.loads(raw)["message_id"] for raw in found}


def recorded(redis_url: str, ns: str, kind: str, count: int) -> Callable[[], bool]:
    return lambda: len(rows_of(kind, journal(redis_url, ns))) >= count


def test_pipelines_groups_and_callbacks_survive_deferrals(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """pipeline: each step's value reaches the next; group: the completion callback runs
    once, after every member ran; on_success / on_failure: once per message, not once per
    deferral."""
    import dramatiq

    pipeline: Any = dramatiq.pipeline  # dramatiq's composition API is untyped
    group: Any = dramatiq.group

    workers = fleet(**LIMITS)
    workers.start_dramatiq(APP, "workers", processes=1)
    m = client_app(workers, monkeypatch)
    ns = workers.env["TT_NS"]

    pipes = [pipeline([m.step.message("pipe", 1), m.step.message("pipe"), m.step.message("pipe")])]
    pipes.append(pipeline([m.step.message("pipe", 3), m.step.message("pipe")]))
    for pipe in pipes:
        pipe.run()
    members = group([m.step.message("group", i) for i in range(5)])
    members.add_completion_callback(m.completed.message("group"))
    members.run()
    callbacks = {"on_success": m.succeeded, "on_failure": m.failed}
    good = [m.step.send_with_options(args=("cb", i), **callbacks) for i in range(3)]
    bad = m.failing.send_with_options(args=("cb", 9), **callbacks)

    assert [result_of(p.messages[-1]) for p in pipes] == [8, 12]
    assert [result_of(c) for c in members.children] == [0, 2, 4, 6, 8]
    assert [result_of(g) for g in good] == [0, 2, 4]
    wait_for(recorded(redis_url, ns, "completed", 1), 30, "the group's completion callback")
    wait_for(recorded(redis_url, ns, "on_success", 3), 30, "the on_success callbacks")
    wait_for(recorded(redis_url, ns, "on_failure", 1), 30, "the on_failure callback")
    wait_for(lambda: bool(dead_letters(redis_url, workers)), 30, "the failure's dead letter")

    rows = journal(redis_url, ns)
    starts = rows_of("start", rows)
    groups = {e.split("group=")[1] for _, e in starts if "group=" in e}
    client = redis.Redis.from_url(redis_url)
    for barrier in groups:  # dramatiq keys a group's barrier by a UUID alone
        client.delete(barrier, f"{barrier}@events")

    pipe_ids = [msg.message_id for pipe in pipes for msg in pipe.messages]
    member_ids = [msg.message_id for msg in members.children]
    cb_ids = [*(g.message_id for g in good), bad.message_id]
    assert_mostly_deferred(rows, pipe_ids, "pipeline steps")
    assert_mostly_deferred(rows, member_ids, "group members")
    assert_mostly_deferred(rows, cb_ids, "messages with callbacks")
    assert_ran_once(rows, [*pipe_ids, *member_ids, *cb_ids])

    # The group: one completion, recorded after every member's start.
    (completion,) = [i for i, row in enumerate(rows) if row[0] == "completed"]
    last_member = max(i for i, row in enumerate(rows) if row[0] == "start" and row[1] in member_ids)
    assert completion > last_member, "the completion callback ran before every member did"
    assert len(groups) == 1

    # Callbacks: once per message, with its result or its exception.
    assert sorted(rows_of("on_success", rows)) == sorted(
        (g.message_id, str(2 * i)) for i, g in enumerate(good)
    )
    assert rows_of("on_failure", rows) == [(bad.message_id, "ValueError")]
    assert dead_letters(redis_url, workers) == {bad.message_id}, "only the failure died"


def test_time_limits_and_retries_survive_deferrals(
    fleet: Callable[..., Fleet], monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """``time_limit`` bounds the body after its turn, not the wait: messages that wait longer
    than their time limit still run, and a body that overruns it is interrupted; messages of
    an actor with ``max_retries=0`` all run however often they are deferred."""
    workers = fleet(**LIMITS)
    workers.start_dramatiq(APP, "workers", processes=1)
    m = client_app(workers, monkeypatch)
    ns = workers.env["TT_NS"]

    # Turns 0.5 s apart under a 1 s time limit (a message option the copies must carry):
    # the last ones wait longer than the limit; the very last overruns it in its body.
    quick = [m.timed.send_with_options(args=("tl", n), time_limit=1000) for n in range(1, 5)]
    overrun = m.timed.send_with_options(args=("tl", 5, True), time_limit=1000)
    retryless = [m.step.send("mr", i) for i in range(6)]

    assert [result_of(q) for q in quick] == [1, 2, 3, 4]
    assert result_of(overrun) == -5
    assert [result_of(r) for r in retryless] == [2 * i for i in range(6)]

    rows = journal(redis_url, ns)
    timed_ids = [*(q.message_id for q in quick), overrun.message_id]
    assert_mostly_deferred(rows, timed_ids, "time-limited messages")
    assert_ran_once(rows, timed_ids)
    assert rows_of("interrupted", rows) == [(overrun.message_id, "")]
    first_seen = {mid: w for k, mid, w, _ in reversed(rows) if k == "delivery"}
    started = {mid: w for k, mid, w, _ in rows if k == "start"}
    waited = {mid: started[mid] - first_seen[mid] for mid in timed_ids}
    assert waited[overrun.message_id] > 1.0, f"the overrun waited only {waited}"
    assert max(waited[q.message_id] for q in quick) > 1.0, f"no quick one waited long: {waited}"

    retryless_ids = [r.message_id for r in retryless]
    assert_mostly_deferred(rows, retryless_ids, "max_retries=0 messages")
    assert_ran_once(rows, retryless_ids)
    assert dead_letters(redis_url, workers) == set(), "a deferral failed a message"
