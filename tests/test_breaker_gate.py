"""The task gates and breakers: a task named with ``@throttled(breaker=...)`` waits while
the breaker refuses, its lease given back; half-open, the gate's probe is the task's."""

from __future__ import annotations

import pytest

from taskthrottle import Breaker, BreakerOpen, InvalidInput, Limit, Limiter, MemoryStore
from taskthrottle._breaker import _permits
from taskthrottle._gate import Defer, book_turn, settle
from taskthrottle._settings import Settings, State
from taskthrottle._throttle import Request, lease_scope, plan, throttled
from taskthrottle.testing import ManualClock

rph = Limit.per_hour("rph", 10)


def gate(clock: ManualClock, name: str, **options: object) -> tuple[State, Breaker, Request]:
    limiter = Limiter(MemoryStore(clock=clock))
    breaker = Breaker(name, limiter, failure_threshold=1, recovery_timeout=30.0, **options)  # type: ignore[arg-type]
    return State(Settings(jitter=0.0), limiter), breaker, Request({"k": [rph]}, {}, (name,))


def trip(breaker: Breaker) -> None:
    with pytest.raises(ConnectionError), breaker:
        raise ConnectionError("down")


def test_the_spec_records_the_breaker() -> None:
    """@throttled(breaker=...) puts the name in every call's request."""

    @throttled(rpm=5, key="tenant:{tenant}", breaker="openai")
    def task(tenant: str) -> None: ...

    assert plan(task.__taskthrottle__, task, ("a",), {}, "t").breakers == ("openai",)  # type: ignore[attr-defined]


def test_an_open_breaker_defers_the_task_and_gives_its_lease_back(clock: ManualClock) -> None:
    """The gate defers by the time left open, with the next copy's header; the tokens
    the grant charged are refunded."""
    state, breaker, ask = gate(clock, "g-open")
    trip(breaker)
    clock.advance(10)
    turn = book_turn(state, ask, "t", {}, 0)
    assert isinstance(turn, Defer)
    assert (turn.wait, turn.meta, turn.why) == (
        20.0,
        {"gen": 1, "attempt": 0},
        "breaker 'g-open', open",
    )
    assert state.limiter().available("k", [rph]) == {"rph": 10.0}


def test_half_open_the_gate_holds_the_probe_for_the_body(clock: ManualClock) -> None:
    """Half-open, the gate takes the one probe slot for the task; the body's call uses it
    rather than asking again, and its success closes the breaker. Other tasks wait,
    polled at slot_poll."""
    state, breaker, ask = gate(clock, "g-half")
    trip(breaker)
    clock.advance(30)
    lease = book_turn(state, ask, "t1", {}, 0)
    assert lease is not None and not isinstance(lease, Defer)
    other = book_turn(state, ask, "t2", {}, 0)
    assert isinstance(other, Defer) and other.wait == state.settings.slot_poll
    with lease_scope(lease):
        assert breaker.call(lambda: "probe") == "probe"
    settle(lease, state.settings, failed=False)
    assert breaker.state().state == "closed"


def test_an_unused_probe_is_given_back_when_the_task_ends(clock: ManualClock) -> None:
    """A task that never called the callee frees its probe slot when it settles."""
    state, breaker, ask = gate(clock, "g-unused")
    trip(breaker)
    clock.advance(30)
    lease = book_turn(state, ask, "t1", {}, 0)
    assert lease is not None and not isinstance(lease, Defer)
    assert lease.id in _permits
    settle(lease, state.settings, failed=False)
    assert lease.id not in _permits
    assert breaker.state().probes == 0
    assert not isinstance(book_turn(state, ask, "t2", {}, 0), Defer)


def test_a_breaker_never_made_is_named(clock: ManualClock) -> None:
    """A task naming a breaker this process never made fails loudly, naming it."""
    state, _, _ = gate(clock, "g-known")
    with pytest.raises(InvalidInput, match="no Breaker named 'nope'"):
        book_turn(state, Request({"k": [rph]}, {}, ("nope",)), "t", {}, 0)


def test_a_gate_error_gives_the_lease_back(clock: ManualClock) -> None:
    """Any error at the breakers (here a breaker never made, after one that gave the task
    its probe permit) is raised with the grant refunded, the concurrency slot freed and
    the permit given back: nothing stays taken for a task that does not run."""
    state, breaker, _ = gate(clock, "g-leak")
    trip(breaker)
    clock.advance(30)
    slots = Limit.concurrency("slots", 1)
    ask = Request({"k": [rph, slots]}, {}, ("g-leak", "nope"))
    with pytest.raises(InvalidInput, match="no Breaker named 'nope'"):
        book_turn(state, ask, "t", {}, 0)
    assert state.limiter().available("k", [rph, slots]) == {"rph": 10.0, "slots": 1.0}
    assert breaker.state()[1:5] == ("half-open", 0, 0, 0)
    assert "t:0:0" not in _permits


def test_breaker_open_is_a_throttled_refusal() -> None:
    """BreakerOpen carries its breaker, state and retry_after, as a Throttled does."""
    exc = BreakerOpen("b", 1.5, "half-open")
    assert (exc.breaker, exc.state, exc.retry_after) == ("b", "half-open", 1.5)
    assert "breaker 'b' is half-open; retry after 1.500s" in str(exc)
