"""Random operation sequences: every store must answer exactly as a tiny reference model.

The model keeps tokens as exact fractions (`fractions.Fraction`) and refills them
continuously, the textbook way; the stores keep integer debits and anchors. Windows (a
fixed window, a quota, a sliding window) it steps forward one window at a time, weighs
with fractions, and searches their waits instead of solving for them. Any difference in a
decision, a wait or an available amount fails the test.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskthrottle import InvalidInput, Lease, Limit, Limiter, MemoryStore, RedisStore, Throttled
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock

LIMITS = [
    Limit.per_second("b", 3, burst=5),
    Limit.parse("s", "7/1500ms"),
    Limit.quota("q", 40, per="hour"),
    Limit.concurrency("c", 3),
    Limit.concurrency("d", 4),  # a second name in the same key's slots
    Limit.per_period("f", 4, 2.0, strategy="fixed_window"),
    Limit.per_period("w", 5, 1.5, strategy="sliding_window"),
]
WINDOWS = ("quota", "fixed_window")
KEYS = ["a", "b"]
TTL_MS = 4000


class Model:
    """Token buckets on exact fractions, fixed windows (quotas) with their debt carried,
    sliding windows weighed with fractions, slots with expiries."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.tokens: dict[tuple[str, str], tuple[Fraction, int]] = {}
        self.quota: dict[tuple[str, str], tuple[int, int]] = {}
        self.sliding: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.slots: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}

    def bucket(self, key: str, limit: Limit) -> Fraction:
        cap, refill, period = limit.spec
        tokens, at = self.tokens.get((key, limit.name), (Fraction(cap), self.now))
        return min(Fraction(cap), tokens + max(0, self.now - at) * Fraction(refill, period))

    def used_quota(self, key: str, limit: Limit, at: int | None = None) -> int:
        """What a fixed window counts at ``at`` (now): each window that starts gives back
        a cap of what was counted, what is left over being debt."""
        cap, _, period = limit.spec
        at = self.now if at is None else at
        used, window = self.quota.get((key, limit.name), (0, at // period))
        for _ in range(window, at // period):
            used = max(0, used - cap)
        return used

    def window_state(self, key: str, limit: Limit, at: int) -> tuple[int, int]:
        """A sliding window's count and previous count at ``at``, stepped window by
        window: each window that starts moves up to a cap of the count to previous."""
        cap, _, period = limit.spec
        count, previous, window = self.sliding.get((key, limit.name), (0, 0, at // period))
        for _ in range(window, at // period):
            previous = min(cap, count)
            count -= previous
        return count, previous

    def used_sliding(self, key: str, limit: Limit, at: int | None = None) -> int:
        """The count plus the previous count weighed by the share of the previous window
        still within the last period, rounded up."""
        at = self.now if at is None else at
        period = limit.spec[2]
        count, previous = self.window_state(key, limit, at)
        share = Fraction(period - at % period, period)
        return count + math.ceil(previous * share)

    def window_wait(self, key: str, limit: Limit, amount: int) -> int:
        """The first instant at which ``amount`` fits, searched: the first window that it
        fits by its last millisecond, then bisected within it (what a window holds only
        shrinks within a window)."""
        cap, _, period = limit.spec
        used = self.used_quota if limit.kind in WINDOWS else self.used_sliding
        low, end = self.now, (self.now // period + 1) * period
        while used(key, limit, end - 1) + amount > cap:
            low, end = end, end + period
        high = end - 1
        while low < high:
            middle = (low + high) // 2
            if used(key, limit, middle) + amount <= cap:
                high = middle
            else:
                low = middle + 1
        return low - self.now

    def live(self, key: str, limit: Limit) -> dict[str, tuple[int, int]]:
        held = self.slots.get((key, limit.name), {})
        return {lid: s for lid, s in held.items() if s[1] > self.now}

    def wait(self, key: str, limit: Limit, amount: int) -> int:
        cap, refill, period = limit.spec
        if limit.kind == "bucket":
            short = amount - self.bucket(key, limit)
            return max(0, -(-short * period // refill))
        if limit.kind in (*WINDOWS, "sliding_window"):
            return self.window_wait(key, limit, amount)
        held = sorted(self.live(key, limit).values(), key=lambda s: s[1])
        used = sum(w for w, _ in held)
        for weight, expiry in [(0, self.now), *held]:
            used -= weight
            if used + amount <= cap:
                return max(1 if weight else 0, expiry - self.now)
        raise AssertionError("amount above capacity")

    def available(self, key: str, limit: Limit) -> int:
        cap = limit.spec[0]
        if limit.kind == "bucket":
            return int(self.bucket(key, limit) // 1)
        if limit.kind in WINDOWS:
            return cap - self.used_quota(key, limit)
        if limit.kind == "sliding_window":
            return cap - self.used_sliding(key, limit)
        return cap - sum(w for w, _ in self.live(key, limit).values())

    def add(self, key: str, limit: Limit, amount: int, lease_id: str, expiry: int) -> None:
        field = (key, limit.name)
        if limit.kind == "bucket":
            self.tokens[field] = (self.bucket(key, limit) - amount, self.now)
        elif limit.kind in WINDOWS:
            used = max(0, self.used_quota(key, limit) + amount)
            self.quota[field] = (used, self.now // limit.spec[2])
        elif limit.kind == "sliding_window":
            count, previous = self.window_state(key, limit, self.now)
            self.sliding[field] = (max(0, count + amount), previous, self.now // limit.spec[2])
        else:
            self.slots[field] = {**self.live(key, limit), lease_id: (amount, expiry)}

    def acquire(
        self, plan: list[tuple[str, Limit, int]], max_wait: int, lease_id: str
    ) -> tuple[bool, int, set[tuple[str, str, int]]]:
        waits = [(key, lim, self.wait(key, lim, amount)) for key, lim, amount in plan]
        worst = max(w for _, _, w in waits)
        refused = {
            (key, lim.name, w)
            for key, lim, w in waits
            if w > (0 if lim.kind == "concurrency" else max_wait)
        }
        if refused:
            return False, worst, refused
        for key, lim, amount in plan:
            self.add(key, lim, amount, lease_id, self.now + worst + TTL_MS)
        return True, worst, set()


@contextmanager
def store_of(kind: str, clock: ManualClock, url: str) -> Iterator[Store]:
    if kind == "memory":
        yield MemoryStore(clock=clock)
        return
    ns = f"prop-{uuid.uuid4().hex[:10]}"
    yield RedisStore.from_url(url, namespace=ns, clock=clock)
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{{{ns}}}:*"))
    if keys:
        client.delete(*keys)


amounts = st.sampled_from([500, 1000, 1000, 2000, 3000, 250])
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.sets(st.sampled_from(KEYS), min_size=1),
            st.lists(st.sampled_from(LIMITS), min_size=1, max_size=7, unique=True),
            st.dictionaries(
                st.sampled_from(["b", "s", "q", "c", "d", "f", "w"]), amounts, max_size=3
            ),
            st.sampled_from([0, 0, 700, 5000]),
        ),
        st.tuples(st.just("advance"), st.integers(0, 3000)),
        st.tuples(
            st.just("adjust"),
            st.integers(0, 50),
            st.sampled_from(["b", "s", "q", "f", "w"]),
            st.integers(-3000, 4000),
        ),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("peek"), st.sampled_from(KEYS)),
    ),
    max_size=40,
)


def run(store_kind: str, url: str, sequence: list[Any]) -> None:
    clock = ManualClock()
    model = Model(int(clock() * 1000))
    leases: list[tuple[Lease, list[tuple[str, Limit, int]]]] = []
    with store_of(store_kind, clock, url) as store:
        limiter = Limiter(store, lease_ttl=TTL_MS / 1000)
        for op in sequence:
            step(op, limiter, model, clock, leases)


def step(op: Any, limiter: Limiter, model: Model, clock: ManualClock, leases: list[Any]) -> None:
    kind = op[0]
    if kind == "advance":
        clock.advance(op[1] / 1000)
        model.now += op[1]
    elif kind == "peek":
        for limit in LIMITS:
            expected = model.available(op[1], limit) / 1000
            assert limiter.available(op[1], [limit])[limit.name] == expected, limit
    elif kind == "acquire":
        acquire(op, limiter, model, leases)
    elif kind == "adjust" and leases:
        lease, plan = leases[op[1] % len(leases)]
        adjust(lease, plan, model, op[2], op[3])
    elif kind == "release" and leases:
        lease, plan = leases[op[1] % len(leases)]
        lease.release()
        for key, lim, _ in plan:
            if lim.kind == "concurrency":
                model.slots.get((key, lim.name), {}).pop(lease.id, None)


def acquire(op: Any, limiter: Limiter, model: Model, leases: list[Any]) -> None:
    _, keys, limits, consume, max_wait = op
    consume = {n: a for n, a in consume.items() if any(lim.name == n for lim in limits)}
    target = {key: limits for key in sorted(keys)}
    plan = [(key, lim, consume.get(lim.name, 1000)) for key in sorted(keys) for lim in limits]
    lease_id = uuid.uuid4().hex
    granted, wait, refused = model.acquire(plan, max_wait, lease_id)
    given_consume = {n: a / 1000 for n, a in consume.items()}
    try:
        booked = limiter.reserve(
            target, consume=given_consume, max_wait=max_wait / 1000, lease_id=lease_id
        )
    except Throttled as exc:
        assert not granted, "store refused what the model grants"
        assert round(exc.retry_after * 1000) == wait
        got = {(v.key, v.limit, round(v.retry_after * 1000)) for v in exc.violations}
        assert got == refused
        return
    assert granted, f"store granted what the model refuses: {refused}"
    assert round(booked.delay * 1000) == wait
    leases.append((booked.redeem(), plan))


def adjust(lease: Lease, plan: list[Any], model: Model, name: str, delta: int) -> None:
    held = [(key, lim) for key, lim, _ in plan if lim.name == name]
    if not held:
        return
    before = lease.consumed.get(name, 0) * 1000
    if before + delta < 0:
        with pytest.raises(InvalidInput):
            lease.adjust(**{name: delta / 1000})
        return
    lease.adjust(**{name: delta / 1000})
    for key, lim in held:
        model.add(key, lim, delta, lease.id, 0)


StoreRun = Callable[[list[Any]], None]


@pytest.fixture(params=["memory", "redis"])
def check(request: pytest.FixtureRequest) -> StoreRun:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    return lambda sequence: run(request.param, url, sequence)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=ops)
def test_stores_match_the_model(check: StoreRun, sequence: list[Any]) -> None:
    """Any sequence of acquires, reservations, adjustments, releases and waits."""
    check(sequence)
