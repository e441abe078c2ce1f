"""An LLM summarizer on Dramatiq: per-tenant rpm and tpm, one provider-wide tpm, real usage.

Every worker process shares the limits through Redis: TT_REDIS, by default
redis://127.0.0.1:6379/0, which is also the broker and the result backend. Every key the
example writes there has TT_NS (by default dramatiq-llm) in its name, so it leaves the rest
of the database alone. See README.md for the two commands that run it.
"""

from __future__ import annotations

import os
import random
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from taskthrottle import Limiter, RedisStore, current_lease, throttled
from taskthrottle.dramatiq import ThrottleMiddleware

REDIS = os.environ.get("TT_REDIS", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TT_QUEUE", "dramatiq_llm")
NAMESPACE = os.environ.get("TT_NS", "dramatiq-llm")

broker = RedisBroker(url=REDIS, namespace=f"{NAMESPACE}-broker")
broker.add_middleware(Results(backend=RedisBackend(url=REDIS, namespace=f"{NAMESPACE}-results")))
broker.add_middleware(
    ThrottleMiddleware(lambda: Limiter(RedisStore.from_url(REDIS, namespace=NAMESPACE)))
)
dramatiq.set_broker(broker)


def estimate(tenant_id: str, prompt: str) -> int:
    """Tokens a prompt is expected to cost: charged up front, corrected afterwards."""
    return len(prompt) // 4 + 256


def fake_llm(prompt: str) -> tuple[str, int]:
    """A stand-in for the rate-limited callee: some latency, and the tokens really used."""
    time.sleep(random.uniform(0.05, 0.2))
    return prompt[:40] + "...", len(prompt) // 4 + random.randint(50, 500)


@dramatiq.actor(queue_name=QUEUE, store_results=True, throttle={"tpm": 100_000, "key": "provider"})
@throttled(rpm=60, tpm=20_000, key="tenant:{tenant_id}", consume={"tpm": estimate})
def summarize(tenant_id: str, prompt: str) -> dict[str, object]:
    """Summarize ``prompt`` for a tenant; report the tokens the call really used."""
    summary, used = fake_llm(prompt)
    lease = current_lease()
    if lease is not None:
        lease.adjust(tpm=used - estimate(tenant_id, prompt))
    return {"tenant": tenant_id, "summary": summary, "tokens": used}
