"""Fixed and sliding windows beside the token bucket: behaviour over every store, and random
sequences against the reference model of test_properties.py (windows stepped one at a
time, weighed with fractions, waits searched), with leases mixing every strategy."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskthrottle import InvalidInput, InvalidType, Limit, Limiter, RedisStore, Throttled
from taskthrottle._entries import entries
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock
from tests.test_properties import TTL_MS, Model, step

#: 2023-11-14 22:13:20 UTC, a whole number of 2 s windows since the epoch.
START = 1_700_000_000.0

fixed = Limit.per_period("f", 5, 2.0, strategy="fixed_window")
sliding = Limit.per_period("s", 4, 2.0, strategy="sliding_window")
bucket = Limit.per_second("b", 3)


def refused(limiter: Limiter, *args: Any, **kwargs: Any) -> Throttled:
    with pytest.raises(Throttled) as info:
        limiter.acquire(*args, **kwargs)
    return info.value


class TestFixedWindow:
    def test_counts_reset_at_each_boundary(self, limiter: Limiter, clock: ManualClock) -> None:
        """Five per window, then refused until the boundary, whose time is the
        retry-after; whole again from the boundary on."""
        clock.set(START + 0.5)
        for _ in range(5):
            limiter.acquire("k", [fixed])
        exc = refused(limiter, "k", [fixed])
        assert exc.retry_after == 1.5
        clock.advance(1.499)
        assert refused(limiter, "k", [fixed]).retry_after == pytest.approx(0.001)
        clock.advance(0.001)
        assert limiter.available("k", [fixed]) == {"f": 5.0}

    def test_the_burst_across_a_boundary_is_twice_the_limit(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """By design: the last millisecond of a window and the first of the next grant a
        window's worth each, so 2 ms see twice the limit, and never more."""
        clock.set(START + 1.999)
        granted = 0
        for _ in range(3):
            while True:
                try:
                    limiter.acquire("k", [fixed])
                except Throttled:
                    break
                granted += 1
            clock.advance(0.001)
        assert granted == 10  # 5 at 1.999 s, 5 at 2.000 s, none at 2.001 s

    def test_debt_carries_into_the_next_windows(self, limiter: Limiter, clock: ManualClock) -> None:
        """Twelve charged in a window of five: the next window starts with seven counted,
        the one after with two."""
        clock.set(START)
        lease = limiter.acquire("k", [fixed])
        lease.adjust(f=11)
        assert limiter.available("k", [fixed]) == {"f": -7.0}
        clock.advance(2)
        assert limiter.available("k", [fixed]) == {"f": -2.0}
        assert refused(limiter, "k", [fixed]).retry_after == 2.0  # two windows repay it
        clock.advance(2)
        assert limiter.available("k", [fixed]) == {"f": 3.0}

    def test_a_refund_gives_back_the_current_window_only(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A refund lowers what the window counts now, never below zero: what was charged
        in a window gone by came back with its end."""
        clock.set(START)
        lease = limiter.acquire("k", [fixed], consume={"f": 4})
        lease.adjust(f=-1)
        assert limiter.available("k", [fixed]) == {"f": 2.0}
        clock.advance(2)
        limiter.acquire("k", [fixed])
        lease.adjust(f=-3)
        assert limiter.available("k", [fixed]) == {"f": 5.0}

    def test_a_reservation_books_a_later_window(self, limiter: Limiter, clock: ManualClock) -> None:
        """A full window books the next within max_wait, its turn the boundary; the window
        after that once the next is booked full too; beyond max_wait it is refused."""
        clock.set(START + 0.25)
        limiter.acquire("k", [fixed], consume={"f": 5})
        assert limiter.reserve("k", [fixed], consume={"f": 5}, max_wait=2).delay == 1.75
        assert limiter.reserve("k", [fixed], max_wait=4).delay == 3.75
        with pytest.raises(Throttled) as info:
            limiter.reserve("k", [fixed], max_wait=1)
        assert info.value.retry_after == 3.75

    def test_a_quota_is_a_fixed_window_of_a_utc_day(self) -> None:
        """`Limit.quota` and a fixed window of a day send the same entries."""
        daily = Limit.per_day("q", 1_000, strategy="fixed_window")
        assert daily.spec == Limit.quota("q", 1_000).spec
        assert entries("k", [daily], None) == entries("k", [Limit.quota("q", 1_000)], None)
        assert daily.strategy == Limit.quota("q", 1_000).strategy == "fixed_window"


class TestSlidingWindow:
    def test_a_full_window_weighs_on_the_next(self, limiter: Limiter, clock: ManualClock) -> None:
        """Four at the end of a window: at the start of the next none passes, and one more
        does for each quarter of it gone by, each retry-after exact."""
        clock.set(START + 1.999)
        limiter.acquire("k", [sliding], consume={"s": 4})
        clock.advance(0.001)
        assert limiter.available("k", [sliding]) == {"s": 0.0}
        assert refused(limiter, "k", [sliding]).retry_after == 0.5
        clock.advance(0.5)
        limiter.acquire("k", [sliding])
        assert refused(limiter, "k", [sliding]).retry_after == 0.5
        clock.advance(1.0)  # three quarters in: a quarter of the four, and the one
        assert limiter.available("k", [sliding]) == {"s": 2.0}

    def test_the_estimate_rounds_up(self, limiter: Limiter, clock: ManualClock) -> None:
        """The previous window's share is rounded up to the millitoken: never generous."""
        clock.set(START)
        limiter.acquire("k", [sliding], consume={"s": 3})
        clock.advance(2.001)
        assert limiter.available("k", [sliding]) == {"s": 1.001}  # 4 - 3 x 1999/2000 = 1.0015

    def test_a_refund_gives_back_the_current_window_only(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A refund lowers the current window's count, not the previous window's."""
        clock.set(START)
        lease = limiter.acquire("k", [sliding], consume={"s": 4})
        clock.advance(2)
        lease.adjust(s=-4)
        assert limiter.available("k", [sliding]) == {"s": 0.0}

    def test_debt_carries_into_the_next_windows(self, limiter: Limiter, clock: ManualClock) -> None:
        """Past the cap, the count carries: a window of four charged ten counts as a full
        previous window and six in the next, then as two."""
        clock.set(START)
        limiter.acquire("k", [sliding]).adjust(s=9)
        clock.advance(2)
        assert limiter.available("k", [sliding]) == {"s": -6.0}
        clock.advance(2)
        assert limiter.available("k", [sliding]) == {"s": -2.0}
        clock.advance(4)
        assert limiter.available("k", [sliding]) == {"s": 4.0}

    def test_a_reservation_waits_for_the_window_to_slide(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A reservation's delay is when the weighed window lets it in."""
        clock.set(START)
        limiter.acquire("k", [sliding], consume={"s": 4})
        assert limiter.reserve("k", [sliding], max_wait=5).delay == 2.5
        assert limiter.reserve("k", [sliding], max_wait=5).delay == 3.0


class TestMixed:
    def test_one_lease_is_all_or_nothing_across_strategies_and_keys(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A lease over every strategy and two keys: one refusing window charges nothing
        anywhere, and its violation names it."""
        clock.set(START)
        conc = Limit.concurrency("c", 2)
        target = {"tenant": [bucket, fixed, conc], "org": [sliding]}
        limiter.acquire("org", [sliding], consume={"s": 4})
        before = [
            limiter.available("tenant", target["tenant"]),
            limiter.available("org", [sliding]),
        ]
        exc = refused(limiter, target)
        assert [(v.key, v.limit) for v in exc.violations] == [("org", "s")]
        after = [limiter.available("tenant", target["tenant"]), limiter.available("org", [sliding])]
        assert after == before
        clock.advance(2.5)
        with limiter.acquire(target):
            assert limiter.available("tenant", target["tenant"]) == {"b": 2.0, "f": 4.0, "c": 1.0}

    def test_reset_makes_every_strategy_whole(self, limiter: Limiter, clock: ManualClock) -> None:
        """reset() forgets windows as it forgets buckets."""
        clock.set(START)
        limiter.acquire("k", [bucket, fixed, sliding], consume={"b": 3, "f": 5, "s": 4})
        limiter.reset("k")
        assert limiter.available("k", [bucket, fixed, sliding]) == {"b": 3, "f": 5, "s": 4}

    def test_wait_time(self, limiter: Limiter, clock: ManualClock) -> None:
        """wait_time reads a full fixed window as the time to its boundary (on this
        machine's clock, as for quotas) and changes nothing."""
        limiter.acquire("k", [fixed], consume={"f": 5})
        assert 0 < limiter.wait_time("k", [fixed]) <= 2.0
        assert limiter.available("k", [fixed]) == {"f": 0.0}


def test_every_redis_key_keeps_a_ttl(redis_url: str, namespace: str) -> None:
    """Windows in debt, booked ahead, refunded: every key their state lives in expires."""
    clock = ManualClock(START)
    limiter = Limiter(RedisStore.from_url(redis_url, namespace=namespace, clock=clock))
    limiter.acquire("a", [fixed, sliding]).adjust(f=20, s=20)
    limiter.reserve("b", [fixed, sliding], consume={"f": 5, "s": 4})
    limiter.reserve("b", [fixed, sliding], max_wait=60)
    limiter.acquire("c", [fixed, sliding]).adjust(f=-1, s=-1)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{namespace}}}:*"))
    assert keys
    assert all(client.pttl(key) > 0 for key in keys)


class TestBadInput:
    @pytest.mark.parametrize("strategy", ["leaky_bucket", "fixed", ""])
    def test_an_unknown_strategy_names_the_choices(self, strategy: str) -> None:
        with pytest.raises(InvalidInput, match="'token_bucket', 'fixed_window', 'sliding_window'"):
            Limit.per_minute("r", 5, strategy=strategy)  # type: ignore[arg-type]

    def test_a_strategy_must_be_text(self) -> None:
        with pytest.raises(InvalidType, match="strategy must be one of"):
            Limit.per_minute("r", 5, strategy=None)  # type: ignore[arg-type]

    @pytest.mark.parametrize("strategy", ["fixed_window", "sliding_window"])
    def test_a_window_takes_no_burst(self, strategy: Any) -> None:
        with pytest.raises(InvalidInput, match=r"takes no burst.*burst=10"):
            Limit.per_minute("r", 5, burst=10, strategy=strategy)

    @pytest.mark.parametrize("period", [7.0, 0.7, 86_400 * 1.5])
    @pytest.mark.parametrize("strategy", ["fixed_window", "sliding_window"])
    def test_a_period_that_does_not_align_with_days_is_refused(
        self, period: float, strategy: Any
    ) -> None:
        with pytest.raises(InvalidInput, match=rf"divide a day evenly .* got {period!r}"):
            Limit.per_period("r", 5, period, strategy=strategy)

    def test_a_period_finer_than_a_millisecond_is_refused(self) -> None:
        with pytest.raises(InvalidInput, match=r"multiple of 0\.001"):
            Limit.per_period("r", 5, 0.0005, strategy="fixed_window")

    def test_a_sliding_window_too_large_to_weigh_exactly(self) -> None:
        with pytest.raises(InvalidInput, match=r"too large .* weigh exactly .* got 1000000"):
            Limit.per_day("r", 1_000_000, strategy="sliding_window")
        assert Limit.per_day("r", 1_000_000, strategy="fixed_window").capacity == 1_000_000

    def test_parse_takes_a_strategy(self) -> None:
        limit = Limit.parse("r", "5000/hour", strategy="fixed_window")
        assert (limit.kind, limit.strategy, limit.spec) == (
            "fixed_window",
            "fixed_window",
            (5_000_000, 0, 3_600_000),
        )
        assert str(limit) == "r: 5000/3600s fixed window"
        assert Limit.per_minute("r", 5).strategy == "token_bucket"
        assert Limit.concurrency("c", 1).strategy is None


#: Random sequences: bucket, windows, a quota and slots under two keys.
LIMITS = [
    bucket,
    Limit.per_period("f", 4, 2.0, strategy="fixed_window"),
    Limit.per_period("w", 5, 1.6, strategy="sliding_window"),  # waits of thirds of 1600
    Limit.quota("q", 9, per="hour"),
    Limit.concurrency("c", 3),
]
NAMES = ["b", "f", "w", "q", "c"]
amounts = st.sampled_from([250, 1000, 1000, 2000, 3000])  # within every capacity
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.sets(st.sampled_from(["a", "b"]), min_size=1),
            st.lists(st.sampled_from(LIMITS), min_size=1, max_size=5, unique=True),
            st.dictionaries(st.sampled_from(NAMES), amounts, max_size=3),
            st.sampled_from([0, 0, 700, 1500, 5000]),
        ),
        st.tuples(st.just("advance"), st.sampled_from([1, 250, 499, 500, 750, 1499, 1500, 3001])),
        st.tuples(
            st.just("adjust"),
            st.integers(0, 30),
            st.sampled_from(["b", "f", "w", "q"]),
            st.sampled_from([-3000, -1000, -1, 1, 1000, 6000]),
        ),
        st.tuples(st.just("release"), st.integers(0, 30)),
    ),
    max_size=30,
)


def check(store: Store, clock: ManualClock, sequence: list[Any]) -> None:
    """Run ``sequence``, comparing every answer with the model and, after each step,
    what every limit of both keys has available."""
    model = Model(round(clock() * 1000))
    limiter = Limiter(store, lease_ttl=TTL_MS / 1000)
    leases: list[Any] = []
    for op in sequence:
        step(op, limiter, model, clock, leases)
        for key in ("a", "b"):
            for limit in LIMITS:
                expected = model.available(key, limit) / 1000
                assert limiter.available(key, [limit])[limit.name] == expected, (op, limit)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=ops, start=st.sampled_from([START, START + 1.25, START + 3599.5]))
def test_stores_match_the_model(make_store: Any, sequence: list[Any], start: float) -> None:
    """Any sequence of mixed-strategy acquires, reservations, adjustments, releases and
    waits: decisions, waits and levels exactly as the model's, on every store."""
    clock = ManualClock(start)
    store = make_store(clock)
    if isinstance(store, RedisStore):  # a namespace per example: examples share the server
        store = RedisStore(store.client, namespace=f"s-{uuid.uuid4().hex[:10]}", clock=clock)
    check(store, clock, sequence)
