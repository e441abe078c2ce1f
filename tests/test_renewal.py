"""A limiter keeps its live leases' concurrency slots held, and only those."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import pytest

from taskthrottle import InvalidInput, Limit, Limiter, MemoryStore, Throttled
from taskthrottle._entries import Entry
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock
from tests.helpers import wait_for

one = Limit.concurrency("one", 1)
two = Limit.concurrency("two", 2)


def test_a_live_lease_outlives_its_ttl(store: Store, clock: ManualClock) -> None:
    """Renewed, a holder keeps its slot past the TTL, however long it runs."""
    limiter = Limiter(store, lease_ttl=10)
    lease = limiter.acquire("k", [one])
    for _ in range(5):  # 40 s in all, renewed every 8 s
        clock.advance(8)
        limiter.renewer.renew()
    with pytest.raises(Throttled):
        limiter.acquire("k", [one])
    lease.release()
    limiter.acquire("k", [one])


def test_a_dead_holders_slot_frees_within_the_ttl(store: Store, clock: ManualClock) -> None:
    """A holder that stops renewing (its process died) frees its slot within the TTL."""
    holder = Limiter(store, lease_ttl=10)
    lease = holder.acquire("k", [one])
    holder.renewer.drop(lease.id)  # as if its process were gone
    other = Limiter(store, lease_ttl=10)
    clock.advance(9)
    with pytest.raises(Throttled):
        other.acquire("k", [one])
    clock.advance(1.01)
    other.acquire("k", [one])


def test_released_leases_are_not_renewed(store: Store, clock: ManualClock) -> None:
    """Release ends renewal: the slot is free at once and stays free."""
    limiter = Limiter(store, lease_ttl=10)
    with limiter.acquire("k", [one]):
        assert len(limiter.renewer.held()) == 1
    assert limiter.renewer.held() == []
    limiter.renewer.renew()
    limiter.acquire("k", [one])


def test_a_reservation_is_renewed_once_redeemed(store: Store, clock: ManualClock) -> None:
    """A booked turn is renewed by whoever redeems it, not by whoever booked it."""
    limiter = Limiter(store, lease_ttl=10)
    reservation = limiter.reserve("k", [one], max_wait=0)
    assert limiter.renewer.held() == []
    lease = reservation.redeem()
    assert limiter.renewer.held() == [lease.id]
    lease.release()
    assert limiter.renewer.held() == []


class CountingStore(MemoryStore):
    """Counts the renew calls and the leases in each."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.renewals: list[int] = []

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        self.renewals.append(len(leases))
        return super().renew(leases, ttl_ms)


def test_one_store_call_renews_every_lease(clock: ManualClock) -> None:
    """However many leases a process holds, one call renews them all."""
    store = CountingStore(clock)
    limiter = Limiter(store, lease_ttl=10)
    leases = [limiter.acquire(f"k{i}", [one, two]) for i in range(20)]
    limiter.renewer.renew()
    assert store.renewals == [20]
    assert all(not lease.released for lease in leases)


def test_a_renewer_thread_runs_while_leases_are_held() -> None:
    """The renewer's thread renews on its own every third of the TTL, and stops renewing
    once the last lease is released."""
    store = CountingStore()
    limiter = Limiter(store, lease_ttl=0.3)
    lease = limiter.acquire("k", [one])
    wait_for(lambda: len(store.renewals) >= 3, 10, "three renewals")
    lease.release()
    wait_for(lambda: limiter.renewer._thread is None, 10, "the renewer to stop")
    assert limiter.renewer.held() == []


def test_a_redelivered_lease_releases_its_slot_again(store: Store, clock: ManualClock) -> None:
    """A lease id that runs again within the op memory (a redelivery of the same attempt)
    takes its released slot again, and its second release frees it again."""
    limiter = Limiter(store, lease_ttl=10)
    limiter.acquire("k", [one], lease_id="task:0:0").release()
    again = limiter.acquire("k", [one], lease_id="task:0:0")
    with pytest.raises(Throttled):
        limiter.acquire("k", [one])
    again.release()
    limiter.acquire("k", [one])


def test_an_adjust_too_large_for_the_store_is_refused(store: Store) -> None:
    """An adjust that the store could not hold exactly is refused before it is sent."""
    big = Limit.per_second("big", 2**40)  # room for 7.9e12 more tokens in a Lua number
    lease = Limiter(store).acquire("k", [big])
    with pytest.raises(InvalidInput, match=r"adjust\(big=8000000000000\) is too large$"):
        lease.adjust(big=8_000_000_000_000)
    lease.adjust(big=7_000_000_000_000)


def test_a_lease_dropped_unreleased_stops_being_renewed(clock: ManualClock) -> None:
    """A lease its caller forgot (never released, no longer referenced) is renewed no more,
    so its slot expires with the TTL instead of being held for the life of the process."""
    limiter = Limiter(MemoryStore(clock=clock), lease_ttl=10)
    limiter.acquire("k", [one])  # not kept
    gc.collect()
    assert limiter.renewer.held() == []
