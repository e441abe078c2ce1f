"""What the integrations share: one delivery's turn, booked, redeemed, or booked again."""

from __future__ import annotations

import time

from taskthrottle import Limit, Limiter, MemoryStore
from taskthrottle._gate import Defer, book_turn
from taskthrottle._settings import Settings, State
from taskthrottle._throttle import Request

rph = Limit.per_hour("rph", 2)
ask = Request({"k": [rph]}, {})


def state() -> State:
    return State(Settings(), Limiter(MemoryStore()))


def test_a_copy_on_time_redeems_its_booked_turn() -> None:
    """A copy back for its turn runs under the lease booked for it, charging nothing more."""
    gate = state()
    gate.limiter().reserve("k", [rph], lease_id="t:0:0")
    meta = {"lease": "t:0:0", "due": time.time(), "gen": 1, "attempt": 0}
    lease = book_turn(gate, ask, "t", meta, 0)
    assert not isinstance(lease, Defer) and lease is not None
    assert lease.id == "t:0:0"
    assert gate.limiter().available("k", [rph])["rph"] < 1.01


def test_a_copy_far_past_its_turn_books_again() -> None:
    """A copy back more than late_after past its turn gives its booking back and books
    anew, so that copies held up together do not all start at once; it is charged once."""
    gate = state()
    gate.limiter().reserve("k", [rph], lease_id="t:0:0")
    meta = {"lease": "t:0:0", "due": time.time() - 10, "gen": 1, "attempt": 0}
    lease = book_turn(gate, ask, "t", meta, 0)
    assert not isinstance(lease, Defer) and lease is not None
    assert lease.id == "t:0:1"
    assert gate.limiter().available("k", [rph])["rph"] < 1.01


def test_a_retry_does_not_redeem_the_attempt_before() -> None:
    """Task.retry copies the headers: the retry's attempt differs, so it pays again."""
    gate = state()
    gate.limiter().reserve("k", [rph], lease_id="t:0:0")
    meta = {"lease": "t:0:0", "due": time.time(), "gen": 1, "attempt": 0}
    lease = book_turn(gate, ask, "t", meta, 1)
    assert not isinstance(lease, Defer) and lease is not None
    assert lease.id == "t:1:0"
    assert gate.limiter().available("k", [rph])["rph"] < 0.01


def test_a_delivery_granted_before_is_dropped_when_it_must_run_once() -> None:
    """A delivery whose lease id was granted already is a duplicate when it was
    acknowledged before it ran: book_turn says so with None."""
    gate = state()
    first = book_turn(gate, ask, "t", {}, 0, once=True)
    assert first is not None and not isinstance(first, Defer)
    assert book_turn(gate, ask, "t", {}, 0, once=True) is None
    again = book_turn(gate, ask, "t", {}, 0)  # a redelivery under acks_late runs again
    assert again is not None and not isinstance(again, Defer)


def test_a_garbled_header_is_a_first_delivery() -> None:
    """Header values of the wrong type (a producer's doing) are read as absent, not raised
    in the worker."""
    gate = state()
    meta = {"lease": 7, "due": "soon", "gen": "x", "attempt": 0}
    lease = book_turn(gate, ask, "t", meta, 0)
    assert not isinstance(lease, Defer) and lease is not None
    assert lease.id == "t:0:0"
