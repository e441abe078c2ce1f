"""One model of the token bucket: `_algorithms` is the reference, and every other copy of
its arithmetic (MemoryStore's fast path and general path, buckets.lua and entries.lua on
real Redis) must give the same answers, step by step, over the same table of cases."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from taskthrottle._algorithms import BucketState, bucket_add, bucket_level, bucket_wait
from taskthrottle._entries import BUCKET, CONCURRENCY, Entry
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock

#: (capacity, refill, period): millitokens, millitokens per period, milliseconds.
SHAPES = [
    (5_000, 1_000, 1_000),  # 5 tokens, 1 a second
    (3_000, 7, 3),  # a rate that never divides evenly
    (120_000_000, 90_000_000, 60_000),  # 90k tokens a minute, bursts to 120k
    (1_000, 1_000, 86_400_000),  # one a day
]


@dataclass
class Step:
    """Advance the clock ``advance_ms``, then ``op`` ("acquire", "settle" or "peek")
    ``amount`` millitokens (acquire: waiting at most ``max_wait_ms`` for the turn)."""

    advance_ms: int
    op: str
    amount: int = 1_000
    max_wait_ms: int = 0


#: Edge cases first: the exact refill instant, debt, refunds past full, a long idle.
EDGES = [
    Step(0, "acquire", 5_000),
    Step(0, "acquire", 1_000),
    Step(999, "acquire", 1_000),
    Step(1, "acquire", 1_000),
    Step(0, "acquire", 3_000, max_wait_ms=10_000),
    Step(0, "peek"),
    Step(500, "settle", -2_500),
    Step(0, "peek"),
    Step(0, "settle", -50_000),
    Step(0, "peek"),
    Step(0, "settle", 7_000),
    Step(0, "acquire", 1_000, max_wait_ms=1_000),
    Step(10_000_000, "peek"),
    Step(0, "acquire", 5_000),
]


def table(seed: int, steps: int = 60) -> list[Step]:
    """A reproducible run of mixed steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        op = rng.choice(["acquire", "acquire", "acquire", "settle", "peek"])
        amount = rng.choice([1, 999, 1_000, 2_500, 5_000])
        if op == "settle":
            amount = rng.choice([-1, 1]) * amount
        out.append(
            Step(rng.choice([0, 0, 1, 3, 250, 1_000, 61_000]), op, amount, rng.choice([0, 2_000]))
        )
    return out


@dataclass
class Reference:
    """The bucket as `_algorithms` computes it."""

    cap: int
    refill: int
    period: int
    state: BucketState | None = None
    now: int = 0
    log: list[tuple[object, ...]] = field(default_factory=list)

    def run(self, step: Step) -> tuple[object, ...]:
        level = bucket_level(self.state, self.now, self.refill, self.period)
        if step.op == "peek":
            return ("peek", self.cap - (0 if level is None else level[2]))
        if step.op == "settle":
            self.state = bucket_add(level, self.now, step.amount)
            return ("settle",)
        if step.amount > self.cap:
            return ("too large",)
        wait = bucket_wait(level, self.now, self.cap, self.refill, self.period, step.amount)
        if wait > step.max_wait_ms:
            return ("refused", wait)
        self.state = bucket_add(level, self.now, step.amount)
        return ("granted", wait)


def run_on_store(store: Store, entry: Entry, step: Step, n: int, slots: bool) -> tuple[object, ...]:
    """One step on a real store; ``slots``: the request also takes a concurrency slot, which
    sends it down the store's general path (entries.lua) instead of the bucket-only one."""
    if step.op == "peek":
        return ("peek", store.peek([entry])[0])
    charged = entry._replace(amount=step.amount)
    if step.op == "settle":
        store.settle(f"op-{n}", f"lease-{n}", [charged], [])
        return ("settle",)
    if step.amount > entry.cap:
        return ("too large",)
    request = [charged]
    if slots:  # a slot no one else holds: it never refuses, it only changes the path
        request.append(Entry(entry.key, "slot", CONCURRENCY, 1_000_000_000, 0, 0, 1_000))
    outcome = store.acquire(f"lease-{n}", request, step.max_wait_ms, 60_000)
    if outcome.granted:
        if slots:
            store.settle(f"free-{n}", f"lease-{n}", [], request[1:])
        return ("granted", outcome.delay_ms)
    return ("refused", outcome.delay_ms)


@pytest.mark.parametrize("slots", [False, True], ids=["bucket path", "general path"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "/".join(map(str, s)))
@pytest.mark.parametrize("steps", ["edges", "seed 1", "seed 2"])
def test_every_copy_of_the_bucket_answers_as_the_reference(
    store: Store, clock: ManualClock, shape: tuple[int, int, int], steps: str, slots: bool
) -> None:
    """Step by step, the store's answers equal `_algorithms`' over the same table."""
    cap, refill, period = shape
    reference = Reference(cap, refill, period, now=round(clock() * 1000))
    entry = Entry("model", "b", BUCKET, cap, refill, period, 1_000)
    run = EDGES if steps == "edges" else table(int(steps.split()[1]))
    for n, step in enumerate(run):
        clock.advance(step.advance_ms / 1000)
        reference.now += step.advance_ms
        expected = reference.run(step)
        assert run_on_store(store, entry, step, n, slots) == expected, (n, step)
