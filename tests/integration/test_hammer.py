"""Eight processes hammer one key on the real Redis: the bucket's bound holds in every window."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Event

import pytest

from taskthrottle import Limit, Limiter, RedisStore, Throttled

PROCESSES = 8
SECONDS = 3.0
RATE, BURST = 200, 20  # tokens per second, capacity


def hammer(url: str, namespace: str, go: Event, out: multiprocessing.Queue[list[int]]) -> None:
    """Acquire as fast as possible until the deadline; report the store's grant times (ms)."""
    limiter = Limiter(RedisStore.from_url(url, namespace=namespace))
    limit = Limit.per_second("rps", RATE, burst=BURST)
    go.wait()
    deadline = time.monotonic() + SECONDS
    granted = []
    while time.monotonic() < deadline:
        try:
            lease = limiter.acquire("shared", [limit])
        except Throttled:
            continue
        granted.append(round(lease.granted_at * 1000))
    out.put(granted)


def most_in_any_window(times: list[int], window_ms: int) -> int:
    """The largest number of grants whose times lie within ``window_ms`` of each other."""
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window_ms:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_eight_processes_never_exceed_the_bucket(redis_url: str, namespace: str) -> None:
    """No window sees more than capacity + rate x window, and the limit is used above 95%."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    out: multiprocessing.Queue[list[int]] = ctx.Queue()
    workers = [
        ctx.Process(target=hammer, args=(redis_url, namespace, go, out)) for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    go.set()
    try:
        reports = [out.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    times = sorted(t for report in reports for t in report)
    assert sum(1 for report in reports if report) >= PROCESSES // 2, "most processes got grants"
    for window_ms in (1, 10, 100, 250, 1000, 2000):
        allowed = BURST + RATE * window_ms // 1000
        assert most_in_any_window(times, window_ms) <= allowed, window_ms
    span_ms = times[-1] - times[0]
    ideal = BURST + RATE * span_ms / 1000
    print(f"grants {len(times)} ideal {ideal:.1f} busiest 1s {most_in_any_window(times, 1000)}")
    assert len(times) >= 0.95 * ideal, f"{len(times)} grants of an ideal {ideal:.0f}"
    assert len(times) <= ideal + 1


@pytest.mark.parametrize("window_ms", [0, 5])
def test_window_counter(window_ms: int) -> None:
    """The window scan counts grants no further apart than the window."""
    times = [0, 1, 2, 10, 11, 40]
    assert most_in_any_window(times, window_ms) == (1 if window_ms == 0 else 3)
