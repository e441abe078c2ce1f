"""What only MemoryStore must show: bounded memory, thread safety, no deadlock."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskthrottle import Limit, Limiter, MemoryStore, Throttled, _memory_keys
from taskthrottle._entries import Entry, entries
from taskthrottle._memory_keys import MAX_REMEMBERED
from taskthrottle.testing import ManualClock

rps = Limit.per_second("rps", 10)


def stored_keys(store: MemoryStore) -> int:
    return sum(len(stripe.keys) for stripe in store._stripes)


def test_idle_keys_are_dropped(clock: ManualClock) -> None:
    """A million one-off keys leave no more than a sweep's worth of state behind."""
    store = MemoryStore(clock=clock)
    limiter = Limiter(store)
    for round_ in range(10):
        for i in range(10_000):
            limiter.acquire(f"user:{round_}:{i}", [rps])
        clock.advance(1)  # every bucket is full again: their state is garbage
    assert stored_keys(store) <= 2 * 10_000 + 64 * 64


def test_full_buckets_leave_no_state(clock: ManualClock) -> None:
    """A refund back to full removes the field; a key with no fields costs nothing."""
    store = MemoryStore(clock=clock)
    lease = Limiter(store).acquire("k", [rps], consume={"rps": 2})
    lease.adjust(rps=-2)
    assert all(not state.fields for stripe in store._stripes for state in stripe.keys.values())


def test_remembered_ids_are_bounded(clock: ManualClock) -> None:
    """Lease ids are remembered (for idempotence) up to a bound, not forever."""
    store = MemoryStore(clock=clock)
    limiter = Limiter(store)
    big = Limit.per_second("big", 1_000_000)
    for _ in range(MAX_REMEMBERED + 10):
        limiter.acquire("k", [big])
    assert len(store._acquired.done) <= MAX_REMEMBERED


def test_bounded_memory_forgets_bookings_ahead_last(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound, the ids whose turns came first are forgotten: a reservation booked
    ahead outlives ids granted after it for now, and is still replayed at its turn."""
    monkeypatch.setattr(_memory_keys, "MAX_REMEMBERED", 100)
    store = MemoryStore(clock=clock)
    slow = entries("k", [Limit.parse("slow", "1/200s")], None)
    assert store.acquire("first", slow, 0, 60_000).granted
    assert store.acquire("booked", slow, 300_000, 60_000).delay_ms == 200_000
    big = entries("other", [Limit.per_second("big", 1_000_000)], None)
    for n in range(150):
        assert store.acquire(f"now-{n}", big, 0, 60_000).granted
    assert len(store._acquired.done) <= 100
    assert "booked" in store._acquired.done
    clock.advance(200)
    before = store.peek(slow)
    assert store.acquire("booked", slow, 0, 60_000).granted
    assert store.peek(slow) == before  # replayed, not charged again


def test_a_refusal_reads_a_bounded_number_of_holders(clock: ManualClock) -> None:
    """A refused acquire on a full concurrency limit of 20,000 holders takes a small multiple
    of one on a limit of one holder, whatever its wait needs (it took 11 to 25 ms, every
    lease read, against 11 us)."""
    store = MemoryStore(clock=clock)
    n = 20_000
    big = entries("big", [Limit.concurrency("conc", n)], None)
    for i in range(n):
        assert store.acquire(f"h{i}", big, 0, 600_000 + i).granted
    one = entries("one", [Limit.concurrency("conc", 1)], None)
    assert store.acquire("h", one, 0, 600_000).granted

    def refusal_time(request: list[Entry]) -> float:
        times = []
        for _ in range(100):
            start = time.perf_counter()
            assert not store.acquire("x", request, 0, 60_000).granted
            times.append(time.perf_counter() - start)
        return min(times)

    base = refusal_time(one)
    every_slot = [big[0]._replace(amount=n * 1000)]
    halved = entries("big", [Limit.concurrency("conc", n // 2)], None)
    for case, request in {"one": big, "every slot": every_slot, "cap halved": halved}.items():
        took = refusal_time(request)
        assert took < 15 * base, f"{case}: {took * 1e6:.0f} us, 1 holder: {base * 1e6:.0f} us"


def test_threads_never_over_admit(clock: ManualClock) -> None:
    """Sixteen threads racing for one key get exactly the capacity, no more."""
    limiter = Limiter(MemoryStore(clock=clock))
    limit = Limit.per_hour("h", 500)
    start = threading.Barrier(16)

    def worker() -> int:
        start.wait()
        granted = 0
        for _ in range(100):
            try:
                limiter.acquire("shared", [limit])
                granted += 1
            except Throttled:
                pass
        return granted

    with ThreadPoolExecutor(16) as pool:
        total = sum(pool.map(lambda _: worker(), range(16)))
    assert total == 500


def test_crossed_multi_key_leases_do_not_deadlock(clock: ManualClock) -> None:
    """Leases over {a, b} and {b, a} from many threads all finish."""
    limiter = Limiter(MemoryStore(clock=clock, stripes=2))
    big = Limit.per_second("big", 1_000_000)

    def worker(flip: bool) -> None:
        for _ in range(2000):
            keys = ["a", "b"] if flip else ["b", "a"]
            limiter.acquire({key: [big] for key in keys})

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert limiter.available("a", [big]) == {"big": 1_000_000 - 8 * 2000}
