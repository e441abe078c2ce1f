"""What only MemoryStore must show: bounded memory, thread safety, no deadlock."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from taskthrottle import Limit, Limiter, MemoryStore, Throttled
from taskthrottle._memory import MAX_REMEMBERED
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
