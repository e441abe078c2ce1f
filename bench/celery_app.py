"""The Celery app that bench.bench_celery runs in real worker processes (env-configured)."""

from __future__ import annotations

import os
import threading
import time

from celery import Celery, signals

import taskthrottle.celery
from taskthrottle import Limit, Limiter, RedisStore, throttled

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/9")
NS = os.environ.get("BENCH_NS", "bench-celery")
RATE = float(os.environ.get("BENCH_RATE", "1000000"))
COUNT = os.environ.get("BENCH_COUNT") == "1"
PROGRESS = os.environ.get("BENCH_PROGRESS") == "1"

app = Celery("bench", broker=REDIS, backend=REDIS)
app.conf.update(
    task_default_queue=NS,
    broker_transport_options={"global_keyprefix": f"{NS}:kombu:"},
    result_backend_transport_options={"global_keyprefix": f"{NS}:results:"},
    worker_prefetch_multiplier=8,
    broker_connection_retry_on_startup=True,
)
taskthrottle.celery.install(app, lambda: Limiter(RedisStore.from_url(REDIS, namespace=NS)))


@app.task(shared=False)
def plain(n: int) -> int:
    """No throttle: the baseline."""
    return n


@app.task(shared=False)
@throttled(Limit.per_second("rps", RATE), key="bench")
def limited(n: int) -> int:
    """One fleet-wide limit (set high for the throughput run, low for the overload run)."""
    return n


@app.task(rate_limit=f"{RATE}/s", shared=False)
def celery_rate_limited(n: int) -> int:
    """The peer: Celery's own rate_limit, which counts per worker node."""
    return n


_deliveries = None


@signals.task_prerun.connect(weak=False, dispatch_uid="bench-deliveries")
def _count(task_id: str, **_: object) -> None:
    """Counts deliveries for the overload run; off in the throughput run, where a Redis
    round trip per task would hide part of what throttling costs."""
    global _deliveries  # noqa: PLW0603  (one client per worker process, made lazily)
    if not COUNT:
        return
    if _deliveries is None:
        import redis

        _deliveries = redis.Redis.from_url(REDIS)
    _deliveries.incr(f"{NS}:deliveries")


class _Progress:
    """Per worker process: tasks done, and when the first began and the last ended
    (monotonic clock, which all processes share). A thread reports it to Redis every 20 ms,
    so the throughput run times the workers themselves at no per-task cost."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def report(self) -> None:
        import redis

        client = redis.Redis.from_url(REDIS)
        sent = -1
        while True:
            time.sleep(0.02)
            if self.count != sent:
                sent = self.count
                value = f"{sent} {self.first} {self.last}"
                client.hset(f"{NS}:progress", str(os.getpid()), value)


_progress: _Progress | None = None


@signals.task_prerun.connect(weak=False, dispatch_uid="bench-progress-start")
def _begin(**_: object) -> None:
    global _progress  # noqa: PLW0603  (one per worker process, made by its first task)
    if PROGRESS and _progress is None:
        _progress = _Progress()
        _progress.first = time.monotonic()
        threading.Thread(target=_progress.report, daemon=True).start()


@signals.task_postrun.connect(weak=False, dispatch_uid="bench-progress-end")
def _end(**_: object) -> None:
    if _progress is not None:
        _progress.last = time.monotonic()
        _progress.count += 1
