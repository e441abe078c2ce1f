"""A fleet-wide LLM budget: per-tenant rpm and tpm, an organisation's tpm, a global pool.

    python examples/llm_budget.py                             # on the embedded MemoryStore
    python examples/llm_budget.py redis://127.0.0.1:6379/0    # on Redis, shared by every run

On Redis every key it writes is under the namespace ``{example-llm}`` (it resets its own
keys at start, nothing else).

Each request estimates its tokens, takes one all-or-nothing lease over three keys, "calls"
a fake model, and adjusts the lease to the tokens really used. A throttled request books a
reservation and waits for its turn instead of retrying blindly.
"""

from __future__ import annotations

import random
import sys
import time

from taskthrottle import Limit, Limiter, MemoryStore, Throttled

TENANT = [Limit.per_minute("rpm", 120, burst=5), Limit.per_minute("tpm", 60_000, burst=3_000)]
ORG = [Limit.per_minute("tpm", 100_000, burst=10_000)]
POOL = [Limit.concurrency("inflight", 4)]


def fake_llm(prompt: str) -> int:
    """Pretend to call a model; return the tokens it used."""
    time.sleep(0.01)
    return len(prompt) // 4 + random.randint(50, 400)


def summarize(limiter: Limiter, tenant: str, prompt: str) -> str:
    keys = {f"tenant:{tenant}": TENANT, "org:acme": ORG, "global": POOL}
    estimate = len(prompt) // 4 + 200
    consume = {"rpm": 1, "tpm": estimate}
    try:
        lease = limiter.acquire(keys, consume=consume)
        waited = 0.0
    except Throttled:
        booked = limiter.reserve(keys, consume=consume, max_wait=30)
        time.sleep(booked.delay)  # a task queue would reschedule the task instead
        lease, waited = booked.redeem(), booked.delay
    with lease:
        used = fake_llm(prompt)
        lease.adjust(tpm=used - estimate)
    return f"tenant {tenant}: {used} tokens, waited {waited:.2f}s"


def main(argv: list[str]) -> None:
    if argv:
        from taskthrottle import RedisStore

        limiter = Limiter(RedisStore.from_url(argv[0], namespace="example-llm"))
    else:
        limiter = Limiter(MemoryStore())
    for key in ("tenant:a", "tenant:b", "org:acme", "global"):
        limiter.reset(key)
    for i in range(8):
        print(summarize(limiter, "ab"[i % 2], "lorem ipsum " * 300))
    print("left in each key's budget:")
    for key, limits in (("tenant:a", TENANT), ("tenant:b", TENANT), ("org:acme", ORG)):
        left = limiter.available(key, limits).items()
        print(f"  {key:9} " + ", ".join(f"{name} {round(amount, 1):g}" for name, amount in left))


if __name__ == "__main__":
    main(sys.argv[1:])
