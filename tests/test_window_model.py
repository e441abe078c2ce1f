"""One model of the fixed and sliding windows, as test_bucket_model.py holds the bucket to
one: `_algorithms` is the reference, and every other copy of the window arithmetic
(MemoryStore's `look`/`charge`, entries.lua on real Redis and on fakeredis) must give the
same answers, step by step, over the same table of cases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from taskthrottle import _algorithms as alg
from taskthrottle._entries import BUCKET, CONCURRENCY, FIXED, SLIDING, Entry
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock
from tests.test_bucket_model import Step, table

#: (capacity, period): millitokens per window, milliseconds.
SHAPES = [
    (5_000, 1_000),  # 5 a second
    (3_000, 7),  # windows shorter than most steps
    (120_000_000, 60_000),  # 120k tokens a minute
    (1_000, 86_400_000),  # one a day
]

#: Edge cases first: the boundary instant, booking later windows, debt over several
#: windows, refunds past zero, a clock stepping back, a long idle.
EDGES = [
    Step(0, "acquire", 5_000),
    Step(0, "acquire", 1_000),
    Step(0, "acquire", 1_000, max_wait_ms=100_000_000),
    Step(0, "peek"),
    Step(1, "acquire", 1_000),
    Step(999, "peek"),
    Step(1, "acquire", 1_000),
    Step(0, "settle", 12_000),
    Step(0, "peek"),
    Step(0, "acquire", 1_000, max_wait_ms=200_000_000),
    Step(-1_500, "peek"),
    Step(0, "acquire", 1_000),
    Step(1_500, "settle", -2_500),
    Step(0, "peek"),
    Step(0, "settle", -50_000),
    Step(0, "peek"),
    Step(333, "acquire", 1_000, max_wait_ms=2_000),
    Step(10_000_000, "peek"),
    Step(0, "acquire", 5_000),
]


@dataclass
class Reference:
    """A window as `_algorithms` computes it."""

    kind: int
    cap: int
    period: int
    now: int
    state: Any = None

    def level(self) -> Any:
        if self.kind == FIXED:
            return alg.window_level(self.state, self.now, self.cap, self.period)
        return alg.sliding_level(self.state, self.now, self.cap, self.period)

    def wait(self, level: Any, amount: int) -> int:
        if self.kind == FIXED:
            return alg.window_wait(level, self.now, self.cap, self.period, amount)
        return alg.sliding_wait(level, self.now, self.cap, self.period, amount)

    def add(self, level: Any, amount: int) -> None:
        if self.kind == FIXED:
            self.state = alg.window_add(level, amount)
        else:
            self.state = alg.sliding_add(level, amount)

    def run(self, step: Step) -> tuple[object, ...]:
        level = self.level()
        if step.op == "peek":
            used = level[0] if self.kind == FIXED else level[3]
            return ("peek", self.cap - used)
        if step.op == "settle":
            self.add(level, step.amount)
            return ("settle",)
        if step.amount > self.cap:
            return ("too large",)
        wait = self.wait(level, step.amount)
        if wait > step.max_wait_ms:
            return ("refused", wait)
        self.add(level, step.amount)
        return ("granted", wait)


def run_on_store(store: Store, entry: Entry, step: Step, n: int, extra: str) -> tuple[object, ...]:
    """One step on a real store; ``extra``: the request also takes a slot or a bucket that
    never refuse, which must change no answer."""
    if step.op == "peek":
        return ("peek", store.peek([entry])[0])
    charged = entry._replace(amount=step.amount)
    if step.op == "settle":
        store.settle(f"op-{n}", f"lease-{n}", [charged], [])
        return ("settle",)
    if step.amount > entry.cap:
        return ("too large",)
    request = [charged]
    if extra == "slot":
        request.append(Entry(entry.key, "slot", CONCURRENCY, 1_000_000_000, 0, 0, 1_000))
    elif extra == "bucket":
        request.append(Entry("other", "bucket", BUCKET, 10**12, 10**9, 1, 1_000))
    outcome = store.acquire(f"lease-{n}", request, step.max_wait_ms, 60_000)
    if outcome.granted:
        if extra == "slot":
            store.settle(f"free-{n}", f"lease-{n}", [], request[1:])
        return ("granted", outcome.delay_ms)
    return ("refused", outcome.delay_ms)


@pytest.mark.parametrize("extra", ["alone", "slot", "bucket"])
@pytest.mark.parametrize("kind", [FIXED, SLIDING], ids=["fixed", "sliding"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "/".join(map(str, s)))
@pytest.mark.parametrize("steps", ["edges", "seed 1", "seed 2", "seed 3"])
def test_every_copy_of_the_windows_answers_as_the_reference(
    store: Store, clock: ManualClock, shape: tuple[int, int], kind: int, steps: str, extra: str
) -> None:
    """Step by step, the store's answers equal `_algorithms`' over the same table."""
    cap, period = shape
    reference = Reference(kind, cap, period, now=round(clock() * 1000))
    refill = cap if kind == SLIDING else 0
    entry = Entry("model", "w", kind, cap, refill, period, 1_000)
    run = EDGES if steps == "edges" else table(int(steps.split()[1]))
    for n, step in enumerate(run):
        clock.advance(step.advance_ms / 1000)
        reference.now += step.advance_ms
        expected = reference.run(step)
        assert run_on_store(store, entry, step, n, extra) == expected, (n, step)
