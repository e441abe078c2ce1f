"""The Dramatiq app that bench.bench_dramatiq runs in real worker processes (env-configured)."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.rate_limits import BucketRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from taskthrottle import Limiter, RedisStore
from taskthrottle.dramatiq import ThrottleMiddleware

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/9")
NS = os.environ.get("BENCH_NS", "bench-dramatiq")
RATE = int(os.environ.get("BENCH_RATE", "20"))

broker = RedisBroker(url=REDIS, namespace=f"{NS}-broker")
broker.add_middleware(ThrottleMiddleware(lambda: Limiter(RedisStore.from_url(REDIS, namespace=NS))))
dramatiq.set_broker(broker)
_journal = redis.Redis.from_url(REDIS)
_bucket = BucketRateLimiter(RedisBackend(url=REDIS), f"{NS}-bucket", limit=RATE, bucket=1000)


class _Deliveries(dramatiq.Middleware):
    """Counts every delivery of each actor."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        _journal.incr(f"{NS}:deliveries:{message.actor_name}")


broker.add_middleware(_Deliveries(), before=ThrottleMiddleware)


@dramatiq.actor(queue_name=NS, throttle={"rps": RATE, "key": "bench"})
def ours(n: int) -> None:
    """Under taskthrottle: deferred to its turn."""
    _journal.incr(f"{NS}:done:ours")


@dramatiq.actor(queue_name=NS)
def theirs(n: int) -> None:
    """Under Dramatiq's BucketRateLimiter: raises, and Retries backs off (its defaults)."""
    with _bucket.acquire():
        _journal.incr(f"{NS}:done:theirs")
