"""An LLM summarizer on Celery: per-tenant rpm and tpm, one provider-wide tpm, real usage.

Every worker of the fleet shares the limits through Redis: TT_REDIS, by default
redis://127.0.0.1:6379/0, which is also the broker and the result backend. Every key the
example writes there starts with TT_NS (by default celery-llm), so it leaves the rest of the
database alone. See README.md for the two commands that run it.
"""

from __future__ import annotations

import os
import random
import time

from celery import Celery

import taskthrottle.celery
from taskthrottle import Limiter, RedisStore, current_lease, throttled

REDIS = os.environ.get("TT_REDIS", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TT_QUEUE", "celery_llm")
NAMESPACE = os.environ.get("TT_NS", "celery-llm")

app = Celery("celery_llm", broker=REDIS, backend=REDIS)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    # Every key under the namespace: the broker's, the results', the parked tasks'.
    broker_transport_options={"global_keyprefix": f"{NAMESPACE}:"},
    result_backend_transport_options={"global_keyprefix": f"{NAMESPACE}:"},
    taskthrottle_namespace=NAMESPACE,
)
taskthrottle.celery.install(app, lambda: Limiter(RedisStore.from_url(REDIS, namespace=NAMESPACE)))


def estimate(tenant_id: str, prompt: str) -> int:
    """Tokens a prompt is expected to cost: charged up front, corrected afterwards."""
    return len(prompt) // 4 + 256


def fake_llm(prompt: str) -> tuple[str, int]:
    """A stand-in for the rate-limited callee: some latency, and the tokens really used."""
    time.sleep(random.uniform(0.05, 0.2))
    used = len(prompt) // 4 + random.randint(50, 500)
    return prompt[:40] + "...", used


@app.task
@throttled(rpm=60, tpm=20_000, key="tenant:{tenant_id}", consume={"tpm": estimate})
@throttled(tpm=100_000, key="provider")  # stacked: one all-or-nothing lease
def summarize(tenant_id: str, prompt: str) -> dict[str, object]:
    """Summarize ``prompt`` for a tenant; report the tokens the call really used."""
    summary, used = fake_llm(prompt)
    lease = current_lease()
    if lease is not None:
        lease.adjust(tpm=used - estimate(tenant_id, prompt))
    return {"tenant": tenant_id, "summary": summary, "tokens": used}
