"""The behaviour every store must show: run over MemoryStore, RedisStore and fakeredis."""

from __future__ import annotations

from typing import Any

import pytest

from taskthrottle import (
    InvalidInput,
    Limit,
    Limiter,
    MemoryStore,
    RedisStore,
    RequestTooLarge,
    Throttled,
    Violation,
)
from taskthrottle._algorithms import SLOTS_READ
from taskthrottle._entries import CONCURRENCY, Entry, Target, entries
from taskthrottle._store import Store
from taskthrottle.testing import DEFAULT_START, ManualClock

rpm = Limit.per_minute("rpm", 60)
tpm = Limit.per_minute("tpm", 90_000, burst=120_000)


def refused(limiter: Limiter, *args: object, **kwargs: object) -> Throttled:
    with pytest.raises(Throttled) as info:
        limiter.acquire(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


def request(target: Target, *limits: Limit) -> list[Entry]:
    """The store entries of a request charging one of each limit, as a limiter sends them."""
    return entries(target, list(limits) if limits else None, None)


def slots(request: list[Entry]) -> list[Entry]:
    """The concurrency entries of ``request``: what its release frees."""
    return [e for e in request if e.kind == CONCURRENCY]


def stored_holders(store: Store, key: str) -> set[str]:
    """The ids of the leases a store keeps in ``key``'s slots, expired or not: what it
    stores, which no answer tells."""
    if isinstance(store, MemoryStore):
        state = store._stripes[hash(key) % len(store._stripes)].keys.get(key)
        fields = {} if state is None else state.fields
        return {
            lease
            for (kind, _), held in fields.items()
            if kind == CONCURRENCY
            for lease in held.leases
        }
    assert isinstance(store, RedisStore)
    members: Any = store.client.zrange(store._codec.key_names(key)[1], 0, -1)
    return {m.decode().split(":", 2)[2] for m in members if not m.startswith(b"#")}


class TestTokenBucket:
    def test_the_issue_example(self, limiter: Limiter) -> None:
        """Acquire, adjust and read back exactly the figures of the documented example."""
        lease = limiter.acquire("tenant:42", [rpm, tpm], consume={"rpm": 1, "tpm": 500})
        lease.adjust(tpm=+734)
        lease.release()
        assert limiter.available("tenant:42", [rpm, tpm]) == {"rpm": 59.0, "tpm": 118766.0}

    def test_capacity_then_refused_with_exact_retry_after(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A full bucket grants its capacity, then refuses until one token has refilled."""
        for _ in range(60):
            limiter.acquire("k", [rpm])
        exc = refused(limiter, "k", [rpm])
        assert exc.retry_after == 1.0
        assert exc.violations == (Violation("k", "rpm", 1.0),)
        clock.advance(0.999)
        assert refused(limiter, "k", [rpm]).retry_after == pytest.approx(0.001)
        clock.advance(0.001)
        limiter.acquire("k", [rpm])

    def test_refill_is_exact_over_many_small_steps(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """Refill computed from the anchor loses nothing to rounding, step after step."""
        slow = Limit.per_day("slow", 3)  # one token every 8 hours: 0.0000347 mt/ms
        for _ in range(3):
            limiter.acquire("k", [slow])
        for _ in range(8 * 60):
            clock.advance(60)
            assert limiter.available("k", [slow])["slow"] <= 1.0
        assert limiter.available("k", [slow]) == {"slow": 1.0}
        limiter.acquire("k", [slow])

    def test_fractional_amounts_are_exact(self, limiter: Limiter) -> None:
        """Ten charges of 0.1 empty a bucket of one, with nothing left over."""
        one = Limit.per_hour("one", 1)
        for _ in range(10):
            limiter.acquire("k", [one], consume={"one": 0.1})
        assert limiter.available("k", [one]) == {"one": 0.0}
        refused(limiter, "k", [one], consume={"one": 0.001})

    def test_burst_sets_capacity(self, limiter: Limiter) -> None:
        """A burst above the rate lets that many through at once."""
        bursty = Limit.per_second("b", 2, burst=5)
        for _ in range(5):
            limiter.acquire("k", [bursty])
        assert refused(limiter, "k", [bursty]).retry_after == 0.5

    def test_sub_second_window(self, limiter: Limiter, clock: ManualClock) -> None:
        """ "10/500ms" refills one token every 50 ms."""
        fast = Limit.parse("fast", "10/500ms")
        for _ in range(10):
            limiter.acquire("k", [fast])
        assert refused(limiter, "k", [fast]).retry_after == 0.05
        clock.advance(0.05)
        limiter.acquire("k", [fast])

    def test_full_bucket_stays_full(self, limiter: Limiter, clock: ManualClock) -> None:
        """Idle time never fills a bucket past its capacity."""
        limiter.acquire("k", [rpm])
        clock.advance(3600)
        assert limiter.available("k", [rpm]) == {"rpm": 60.0}

    def test_the_largest_limit_grants_its_whole_capacity(self, limiter: Limiter) -> None:
        """A limit at the bound `Limit` allows stays exact in every store, Lua's doubles too:
        its whole capacity in one request is granted, not refused as malformed."""
        big = Limit.per_second("big", 5, burst=4_503_599_627_370)
        limiter.acquire("k", [big], consume={"big": 4_503_599_627_370})
        assert limiter.available("k", [big]) == {"big": 0.0}

    def test_clock_stepping_back_mints_nothing(self, limiter: Limiter, clock: ManualClock) -> None:
        """After a failover to a server whose clock is behind, no tokens appear."""
        for _ in range(60):
            limiter.acquire("k", [rpm])
        clock.advance(-30)
        assert limiter.available("k", [rpm]) == {"rpm": 0.0}
        refused(limiter, "k", [rpm])


class TestAllOrNothing:
    def test_one_refusal_charges_nothing(self, limiter: Limiter) -> None:
        """When tpm refuses, rpm is not charged either."""
        limiter.acquire("k", [tpm], consume={"tpm": 100_000})
        exc = refused(limiter, "k", [rpm, tpm], consume={"rpm": 1, "tpm": 20_001})
        assert [v.limit for v in exc.violations] == ["tpm"]
        assert limiter.available("k", [rpm, tpm]) == {"rpm": 60.0, "tpm": 20_000.0}

    def test_retry_after_is_the_largest_wait(self, limiter: Limiter) -> None:
        """Every violated limit is named, and retry_after waits for the slowest."""
        limiter.acquire("k", [rpm, tpm], consume={"rpm": 60, "tpm": 120_000})
        exc = refused(limiter, "k", [rpm, tpm], consume={"rpm": 1, "tpm": 3000})
        assert {v.limit: v.retry_after for v in exc.violations} == {"rpm": 1.0, "tpm": 2.0}
        assert exc.retry_after == 2.0

    def test_multi_key_lease_charges_every_key_carrying_a_name(self, limiter: Limiter) -> None:
        """A name in consume charges each key of the lease that has a limit of that name."""
        org_tpm = Limit.per_minute("tpm", 1_000_000)
        pool = Limit.concurrency("pool", 10)
        lease = limiter.acquire(
            {"tenant:42": [rpm, tpm], "org:7": [org_tpm], "global": [pool]},
            consume={"rpm": 1, "tpm": 500},
        )
        assert limiter.available("tenant:42", [rpm, tpm]) == {"rpm": 59.0, "tpm": 119_500.0}
        assert limiter.available("org:7", [org_tpm]) == {"tpm": 999_500.0}
        assert limiter.available("global", [pool]) == {"pool": 9.0}
        lease.adjust(tpm=100)
        assert limiter.available("org:7", [org_tpm]) == {"tpm": 999_400.0}
        assert limiter.available("tenant:42", [tpm]) == {"tpm": 119_400.0}
        lease.release()
        assert limiter.available("global", [pool]) == {"pool": 10.0}

    def test_violation_names_the_refusing_key(self, limiter: Limiter) -> None:
        """The same limit name under two keys: the violation says which key refused."""
        small = Limit.per_minute("tpm", 1000)
        limiter.acquire("org:7", [small], consume={"tpm": 1000})
        exc = refused(limiter, {"tenant:1": [tpm], "org:7": [small]}, consume={"tpm": 10})
        assert exc.violations == (Violation("org:7", "tpm", 0.6),)
        assert limiter.available("tenant:1", [tpm]) == {"tpm": 120_000.0}

    def test_a_request_that_can_never_pass_is_an_error(self, limiter: Limiter) -> None:
        """Asking more than a capacity raises at once instead of reporting a throttle."""
        with pytest.raises(RequestTooLarge, match="120001"):
            limiter.acquire("k", [tpm], consume={"tpm": 120_001})
        with pytest.raises(RequestTooLarge, match="'c'"):
            limiter.acquire("k", [Limit.concurrency("c", 2)], consume={"c": 3})


class TestAdjust:
    def test_debt_delays_the_next_request_exactly(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """Charging past the capacity puts the bucket in debt, and retry_after repays it."""
        lease = limiter.acquire("k", [tpm], consume={"tpm": 100_000})
        lease.adjust(tpm=+50_000)  # 30,000 tokens of debt
        assert limiter.available("k", [tpm]) == {"tpm": -30_000.0}
        exc = refused(limiter, "k", [tpm], consume={"tpm": 1500})
        assert exc.retry_after == 21.0  # (30,000 + 1,500) / 1,500 per second
        clock.advance(21)
        limiter.acquire("k", [tpm], consume={"tpm": 1500})

    def test_refund_never_overfills(self, limiter: Limiter, clock: ManualClock) -> None:
        """A refund after the bucket refilled stops at full."""
        lease = limiter.acquire("k", [tpm], consume={"tpm": 5000})
        clock.advance(2)
        lease.adjust(tpm=-5000)
        assert limiter.available("k", [tpm]) == {"tpm": 120_000.0}

    def test_refund_returns_tokens(self, limiter: Limiter) -> None:
        """A negative adjustment gives tokens back at once."""
        lease = limiter.acquire("k", [tpm], consume={"tpm": 5000})
        lease.adjust(tpm=-3000)
        assert limiter.available("k", [tpm]) == {"tpm": 118_000.0}
        assert lease.consumed == {"tpm": 2000.0}


class TestConcurrency:
    def test_slots_are_freed_by_release(self, limiter: Limiter) -> None:
        """At most n leases are in flight; a release makes room; releasing twice is harmless."""
        conc = Limit.concurrency("conc", 2)
        first = limiter.acquire("k", [conc])
        limiter.acquire("k", [conc])
        exc = refused(limiter, "k", [conc])
        assert exc.violations[0].limit == "conc"
        first.release()
        first.release()
        assert limiter.available("k", [conc]) == {"conc": 1.0}
        limiter.acquire("k", [conc])
        refused(limiter, "k", [conc])

    def test_dead_holders_slots_come_back_after_the_ttl(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A lease never released is reclaimed after its TTL; retry_after says when."""
        conc = Limit.concurrency("conc", 1)
        limiter.acquire("k", [conc], ttl=30)
        assert refused(limiter, "k", [conc]).retry_after == 30.0
        clock.advance(30)
        limiter.acquire("k", [conc])

    def test_a_lease_acquiring_again_holds_its_slot_once(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A lease id that acquires again once its op is forgotten (a task redelivered
        minutes later, say) still holds one slot, and one release frees it."""
        conc = Limit.concurrency("conc", 2)
        limiter.acquire("k", [conc], lease_id="task-3:0")
        clock.advance(61)
        lease = limiter.acquire("k", [conc], lease_id="task-3:0")
        assert limiter.available("k", [conc]) == {"conc": 1.0}
        lease.release()
        assert limiter.available("k", [conc]) == {"conc": 2.0}

    def test_weighted_slots(self, limiter: Limiter) -> None:
        """consume names how many slots a lease takes."""
        conc = Limit.concurrency("conc", 4)
        limiter.acquire("k", [conc], consume={"conc": 3})
        refused(limiter, "k", [conc], consume={"conc": 2})
        limiter.acquire("k", [conc])

    def test_a_refusal_prunes_expired_holders(self, store: Store, clock: ManualClock) -> None:
        """A refused acquire forgets the holders whose slots expired, as a grant does (and
        no answer can tell): the next refusal need not read them again."""
        conc = request("k", Limit.concurrency("conc", 2))
        assert store.acquire("brief", conc, 0, 10_000).granted
        assert store.acquire("long", conc, 0, 100_000).granted
        clock.advance(20)
        two = request("k", Limit.concurrency("conc", 2)).copy()
        two[0] = two[0]._replace(amount=2000)
        assert store.acquire("wide", two, 0, 10_000).violations == ((0, 80_000),)
        assert stored_holders(store, "k") == {"long"}
        assert store.peek(conc) == [1000]
        store.settle("long:r", "long", [], conc)
        assert store.peek(conc) == [2000]
        assert store.acquire("wide", two, 0, 10_000).granted

    def test_a_refusal_reads_a_bounded_number_of_holders(
        self, store: Store, clock: ManualClock
    ) -> None:
        """A refusal reads at most SLOTS_READ holders, soonest expiry first: the wait is
        exact when they free enough, and past them it is the request's ttl, or the expiry
        of the last holder read if later."""
        holders = SLOTS_READ + 20
        conc = request("k", Limit.concurrency("conc", holders))
        for n in range(holders):
            assert store.acquire(f"h{n}", conc, 0, 60_000 + 10 * n).granted

        def wanting(slots: int) -> list[Entry]:
            return [conc[0]._replace(amount=1000 * slots)]

        exact = store.acquire("x", wanting(SLOTS_READ), 0, 5_000)
        assert exact.violations == ((0, 60_000 + 10 * (SLOTS_READ - 1)),)
        beyond = wanting(SLOTS_READ + 1)
        assert store.acquire("x", beyond, 0, 5_000).violations == ((0, 60_990),)
        assert store.acquire("x", beyond, 0, 300_000).violations == ((0, 300_000),)
        clock.advance(61)  # holders 0 to 100 expired, and are pruned: 19 are left to read
        assert store.acquire("x", wanting(110), 0, 5_000).violations == ((0, 90),)

    def test_the_bound_counts_the_holders_of_every_limit_of_the_key(
        self, store: Store, clock: ManualClock
    ) -> None:
        """Redis keeps the slots of every limit of a key in one sorted set, read in one
        order: the holders of another limit expiring first count towards the bound (and free
        nothing), in every store alike."""
        other = request("k", Limit.concurrency("other", SLOTS_READ))
        for n in range(SLOTS_READ):
            assert store.acquire(f"o{n}", other, 0, 10_000 + n).granted
        conc = request("k", Limit.concurrency("conc", 1))
        assert store.acquire("holder", conc, 0, 300_000).granted
        assert store.acquire("x", conc, 0, 5_000).violations == ((0, 10_000 + SLOTS_READ - 1),)
        clock.advance(10)  # o0 expired: the read reaches the holder of "conc"
        assert store.acquire("x", conc, 0, 5_000).violations == ((0, 290_000),)

    def test_context_manager_releases(self, limiter: Limiter) -> None:
        """Leaving the with block releases the slot, even on error."""
        conc = Limit.concurrency("conc", 1)
        with pytest.raises(RuntimeError), limiter.acquire("k", [conc]) as lease:
            assert not lease.released
            raise RuntimeError
        assert lease.released
        limiter.acquire("k", [conc])


class TestQuota:
    def test_resets_at_midnight_utc(self, limiter: Limiter, clock: ManualClock) -> None:
        """A daily quota refuses until the next UTC midnight, then is whole again."""
        clock.set(86400 * 20000 + 86400 - 10)  # 10 s before a midnight
        daily = Limit.quota("daily", 1_000_000)
        limiter.acquire("k", [daily], consume={"daily": 1_000_000})
        exc = refused(limiter, "k", [daily], consume={"daily": 1})
        assert exc.retry_after == 10.0
        clock.advance(10)
        assert limiter.available("k", [daily]) == {"daily": 1_000_000.0}

    def test_hourly_quota_and_refund(self, limiter: Limiter, clock: ManualClock) -> None:
        """An hourly quota counts within the hour; a refund returns tokens."""
        clock.set(3600 * 500000)
        hourly = Limit.quota("hourly", 10, per="hour")
        lease = limiter.acquire("k", [hourly], consume={"hourly": 10})
        assert refused(limiter, "k", [hourly]).retry_after == 3600.0
        lease.adjust(hourly=-4)
        assert limiter.available("k", [hourly]) == {"hourly": 4.0}


class TestReservations:
    def test_turns_are_handed_out_in_order(self, limiter: Limiter) -> None:
        """Each reservation queues behind the ones before it, first come first served."""
        per_second = Limit.per_second("rps", 1)
        delays = [limiter.reserve("k", [per_second]).delay for _ in range(4)]
        assert delays == [0.0, 1.0, 2.0, 3.0]
        exc = refused(limiter, "k", [per_second])
        assert exc.retry_after == 4.0

    def test_beyond_max_wait_is_refused_and_charges_nothing(self, limiter: Limiter) -> None:
        """A turn further than max_wait raises Throttled and leaves the bucket alone."""
        per_second = Limit.per_second("rps", 1)
        limiter.reserve("k", [per_second])
        limiter.reserve("k", [per_second], max_wait=5)
        with pytest.raises(Throttled) as info:
            limiter.reserve("k", [per_second], max_wait=0.5)
        assert info.value.retry_after == 2.0
        assert limiter.reserve("k", [per_second], max_wait=5).delay == 2.0

    def test_cancel_gives_tokens_back(self, limiter: Limiter) -> None:
        """A cancelled reservation frees its turn for the next caller."""
        per_second = Limit.per_second("rps", 1)
        limiter.reserve("k", [per_second])
        second = limiter.reserve("k", [per_second])
        second.cancel()
        second.cancel()
        assert limiter.reserve("k", [per_second]).delay == 1.0

    def test_redeem_charges_nothing_more(self, limiter: Limiter, clock: ManualClock) -> None:
        """Redeeming at the turn yields the lease without a second charge."""
        per_second = Limit.per_second("rps", 1)
        limiter.reserve("k", [per_second])
        booked = limiter.reserve("k", [per_second], consume={"rps": 1})
        clock.advance(booked.delay)
        lease = booked.redeem()
        assert lease.consumed == {"rps": 1.0}
        assert limiter.available("k", [per_second]) == {"rps": 0.0}

    @pytest.mark.parametrize(
        "others", [[], [Limit.quota("q", 10, per="hour")]], ids=["buckets", "entries"]
    )
    def test_a_booking_is_replayed_until_a_minute_past_its_turn(
        self, store: Store, clock: ManualClock, others: list[Limit]
    ) -> None:
        """A lease id booked 200 s ahead acquires again for free until a minute past its
        turn (so that a deferred task proves its booking by its lease id), while an id never
        booked, or booked too long ago, is charged like a first delivery."""
        booked = request("k", Limit.parse("slow", "1/200s"), *others)
        assert store.acquire("first", booked, 0, 60_000).granted
        assert store.acquire("booked", booked, 300_000, 60_000).delay_ms == 200_000

        def charged_once(lease_id: str) -> bool:
            before = store.peek(booked)
            assert store.acquire(lease_id, booked, 600_000, 60_000).granted
            return store.peek(booked) == [level - 1000 for level in before]

        for at, delay in ((190, 10_000), (250, 0), (259.999, 0)):
            clock.set(DEFAULT_START + at)
            before = store.peek(booked)
            again = store.acquire("booked", booked, 0, 60_000)
            assert (again.granted, again.delay_ms) == (True, delay)
            assert store.peek(booked) == before  # replayed: nothing charged
        assert charged_once("forged")
        clock.set(DEFAULT_START + 260)
        assert charged_once("booked")  # a minute past its turn: stale

    def test_slots_must_be_free_now(self, limiter: Limiter) -> None:
        """Concurrency slots cannot be booked ahead; a free one is held from now."""
        conc = Limit.concurrency("conc", 1)
        booked = limiter.reserve("k", [conc, Limit.per_second("rps", 1)])
        with pytest.raises(Throttled) as info:
            limiter.reserve("k", [conc], max_wait=600)
        assert info.value.violations[0].limit == "conc"
        booked.cancel()
        limiter.reserve("k", [conc])


class TestKeys:
    @pytest.mark.parametrize(
        "key",
        ["a:b", "{braces}", "}{", "with space", "ünïcödé ✓", "x" * 1024, "b:a", "c:a", "op:1"],
    )
    def test_any_text_is_a_key_of_its_own(self, limiter: Limiter, key: str) -> None:
        """Keys with separators, braces and unicode neither collide nor break."""
        one = Limit.per_hour("one", 1)
        limiter.acquire(key, [one])
        refused(limiter, key, [one])
        for other in ("a", "b", "a:b:one", key + " ", "{braces"):
            if other != key:
                assert limiter.available(other, [one]) == {"one": 1.0}

    def test_reset_makes_a_key_full(self, limiter: Limiter) -> None:
        """reset forgets buckets and slots of one key and no other."""
        conc = Limit.concurrency("conc", 1)
        limiter.acquire("k", [rpm, conc], consume={"rpm": 60})
        limiter.acquire("other", [rpm], consume={"rpm": 60})
        limiter.reset("k")
        assert limiter.available("k", [rpm, conc]) == {"rpm": 60.0, "conc": 1.0}
        assert limiter.available("other", [rpm]) == {"rpm": 0.0}


class TestIdempotence:
    def test_repeating_a_lease_id_charges_once(self, limiter: Limiter) -> None:
        """A retried acquire (the same lease id) returns the grant without charging again."""
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-1:0")
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-1:0")
        assert limiter.available("k", [rpm]) == {"rpm": 50.0}

    def test_repeating_a_settle_applies_once(self, store: object, limiter: Limiter) -> None:
        """The same settle id twice adjusts once."""
        lease = limiter.acquire("k", [rpm], consume={"rpm": 10})
        op_id, deltas = lease._deltas({"rpm": 5})
        limiter.store.settle(op_id, lease.id, deltas, [])
        limiter.store.settle(op_id, lease.id, deltas, [])
        assert limiter.available("k", [rpm]) == {"rpm": 45.0}

    def test_ids_are_remembered_for_a_minute_then_forgotten(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """A repeat across a minute boundary still charges once; two minutes later the
        id is forgotten and charges again."""
        clock.set(60 * 28_333_333 + 59.5)  # half a second before a minute boundary
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-9:0")
        clock.advance(1)
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-9:0")
        assert limiter.available("k", [rpm]) == {"rpm": 51.0}
        clock.advance(130)
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-9:0")
        assert limiter.available("k", [rpm]) == {"rpm": 50.0}

    @pytest.mark.parametrize("phase", [0, 30, 59.5, 61, 100, 119.5])
    def test_ids_are_remembered_for_at_least_a_minute(
        self, limiter: Limiter, clock: ManualClock, phase: float
    ) -> None:
        """Wherever a call falls against the clock's minutes, its repeat 59.9 s later still
        charges nothing."""
        clock.set(120 * 14_166_666 + phase)  # `phase` seconds into a two-minute window
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-7:0")
        clock.advance(59.9)  # the bucket is full again by now: a second charge would show
        limiter.acquire("k", [rpm], consume={"rpm": 10}, lease_id="task-7:0")
        assert limiter.available("k", [rpm]) == {"rpm": 60.0}


class TestOpIds:
    """An acquire is remembered by its lease id, a settle by its op id, in two spaces: the
    release of lease "job" (op "job:r") is no lease "job:r", nor the reverse."""

    @pytest.mark.parametrize("kinds", ["buckets", "mixed"])
    def test_a_repeat_says_it_is_one(self, store: Store, kinds: str) -> None:
        """A grant of a lease id granted before says so (``replayed``); a first grant, or a
        booking ahead, does not."""
        limits = [Limit.per_second("rps", 1)]
        if kinds == "mixed":
            limits.append(Limit.concurrency("conc", 2))
        first = store.acquire("job", request("k", *limits), 5_000, 10_000)
        ahead = store.acquire("next", request("k", *limits), 5_000, 10_000)
        again = store.acquire("job", request("k", *limits), 5_000, 10_000)
        later = store.acquire("next", request("k", *limits), 5_000, 10_000)
        assert [o.replayed for o in (first, ahead, again, later)] == [False, False, True, True]
        assert (later.granted, later.delay_ms) == (True, 1_000)

    def test_a_settle_id_never_passes_for_a_lease_id(self, store: Store) -> None:
        """Lease "job:r" after lease "job" was released is granted and charged, not replayed."""
        conc, one = Limit.concurrency("conc", 2), Limit.per_hour("one", 5)
        both = request("k", one, conc)
        assert store.acquire("job", both, 0, 60_000).granted
        store.settle("job:r", "job", [], slots(both))
        assert store.acquire("job:r", both, 0, 60_000).granted
        assert store.peek(both) == [3000, 1000]

    def test_a_lease_id_never_passes_for_a_settle_id(self, store: Store) -> None:
        """Lease "job" releases (op "job:r") although a lease "job:r" was granted before."""
        conc = Limit.concurrency("conc", 2)
        slot = request("k", conc)
        assert store.acquire("job:r", slot, 0, 60_000).granted
        assert store.acquire("job", slot, 0, 60_000).granted
        store.settle("job:r", "job", [], slot)
        assert store.peek(slot) == [1000]


class TestOwnSlots:
    """A lease id that acquires again takes its own slots back: never blocked by them, never
    holding them twice, and never past the cap."""

    def test_a_repeat_within_the_op_memory_moves_the_slots_expiry(
        self, store: Store, clock: ManualClock
    ) -> None:
        """A holder with a 10 s ttl that acquires again at 8 s (a replay: its op is
        remembered) holds its slot until 18 s, and nobody else gets it before."""
        slot = request("k", Limit.concurrency("conc", 1))
        assert store.acquire("holder", slot, 0, 10_000).granted
        clock.advance(8)
        again = store.acquire("holder", slot, 0, 10_000)
        assert (again.granted, again.delay_ms) == (True, 0)
        assert store.peek(slot) == [0]
        assert store.acquire("other", slot, 0, 10_000).violations == ((0, 10_000),)
        clock.advance(9.999)
        assert store.acquire("other", slot, 0, 10_000).violations == ((0, 1),)
        assert store.peek(slot) == [0]
        clock.advance(0.001)
        assert store.acquire("other", slot, 0, 10_000).granted
        assert store.peek(slot) == [0]

    def test_a_repeat_after_the_op_memory_is_not_blocked_by_its_own_slot(
        self, store: Store, clock: ManualClock
    ) -> None:
        """Its op forgotten, a holder acquiring again passes although the limit is full
        (of its own slot), and holds that one slot until its new expiry."""
        slot = request("k", Limit.concurrency("conc", 1))
        assert store.acquire("holder", slot, 0, 300_000).granted
        clock.advance(61)
        assert store.acquire("holder", slot, 0, 300_000).granted
        assert store.peek(slot) == [0]
        assert store.acquire("other", slot, 0, 300_000).violations == ((0, 300_000),)

    def test_its_own_slots_are_not_in_its_wait(self, store: Store, clock: ManualClock) -> None:
        """Refused (the limit shrank to one slot, another lease holds it), a holder waits for
        that other lease, not for its own slot to expire."""
        slot = request("k", Limit.concurrency("conc", 2))
        assert store.acquire("holder", slot, 0, 100_000).granted
        assert store.acquire("other", slot, 0, 300_000).granted
        clock.advance(61)
        shrunk = request("k", Limit.concurrency("conc", 1))
        again = store.acquire("holder", shrunk, 0, 100_000)
        assert (again.granted, again.violations) == (False, ((0, 239_000),))

    def test_a_repeat_after_a_release_takes_the_slot_again(self, store: Store) -> None:
        """A replay holds the slot again, released meanwhile, when it fits; it charges no
        bucket again."""
        conc = Limit.concurrency("conc", 1)
        both = request("k", Limit.per_hour("one", 5), conc)
        assert store.acquire("job", both, 0, 10_000).granted
        store.settle("job:r", "job", [], slots(both))
        assert store.peek(both) == [4000, 1000]
        assert store.acquire("job", both, 0, 10_000).granted
        assert store.peek(both) == [4000, 0]
        assert store.acquire("other", request("k", conc), 0, 10_000).violations == ((0, 10_000),)

    def test_a_repeat_never_exceeds_the_cap(self, store: Store, clock: ManualClock) -> None:
        """A replay whose slot expired and went to another lease is refused."""
        both = request("k", Limit.per_hour("one", 5), Limit.concurrency("conc", 1))
        assert store.acquire("job", both, 0, 1_000).granted
        clock.advance(2)
        assert store.acquire("other", both, 0, 10_000).granted
        again = store.acquire("job", both, 0, 10_000)
        assert (again.granted, again.violations) == (False, ((1, 10_000),))
        assert store.peek(both)[1] == 0


class TestRenew:
    """`renew` moves the expiry of slots still held, many leases in one operation."""

    def test_a_renewed_slot_is_held_past_its_first_expiry(
        self, store: Store, clock: ManualClock
    ) -> None:
        """Renewed at 8 s for 10 s, a slot taken with a 10 s ttl is held, and counted, until
        18 s."""
        slot = request("k", Limit.concurrency("conc", 1))
        assert store.acquire("a", slot, 0, 10_000).granted
        clock.advance(8)
        assert store.renew([("a", slot)], 10_000) == [True]
        clock.advance(4)
        assert store.peek(slot) == [0]
        assert store.acquire("b", slot, 0, 10_000).violations == ((0, 6_000),)
        clock.advance(6)
        assert store.acquire("b", slot, 0, 10_000).granted

    def test_a_slot_gone_renews_as_false_and_stays_gone(
        self, store: Store, clock: ManualClock
    ) -> None:
        """A released lease and an expired one renew as False; neither slot comes back."""
        slot = request("k", Limit.concurrency("conc", 2))
        assert store.acquire("released", slot, 0, 10_000).granted
        store.settle("released:r", "released", [], slot)
        assert store.acquire("expired", slot, 0, 1_000).granted
        clock.advance(1)
        assert store.renew([("released", slot), ("expired", slot)], 10_000) == [False, False]
        assert store.peek(slot) == [2000]

    def test_many_leases_at_once(self, store: Store, clock: ManualClock) -> None:
        """Leases over two keys and two limits: one answer each, in order; a lease that lost
        one slot is False, its other slot renewed all the same; other entries are ignored."""
        conc, pool = Limit.concurrency("conc", 5), Limit.concurrency("pool", 5)
        leases = []
        for n in range(4):
            lease = request({"k1": [rpm, conc], "k2": [pool]})
            assert store.acquire(f"lease-{n}", lease, 0, 10_000).granted
            leases.append((f"lease-{n}", lease))
        store.settle("lease-2:r", "lease-2", [], request("k1", conc))
        clock.advance(8)
        no_slots = ("buckets", request("k1", rpm))
        assert store.renew([*leases, no_slots], 10_000) == [True, True, False, True, True]
        clock.advance(4)
        assert store.peek(request("k1", conc) + request("k2", pool)) == [2000, 1000]

    def test_nothing_to_renew(self, store: Store) -> None:
        """No leases: no answers; a bad ttl is refused by value."""
        assert store.renew([], 10_000) == []
        with pytest.raises(InvalidInput, match="ttl_ms"):
            store.renew([("a", request("k", Limit.concurrency("conc", 1)))], 0)


class TestWaitTime:
    def test_wait_time_reads_without_charging(self, limiter: Limiter, clock: ManualClock) -> None:
        """wait_time says when a request would pass, and changes nothing."""
        assert limiter.wait_time("k", [rpm, tpm], consume={"tpm": 500}) == 0.0
        limiter.acquire("k", [rpm], consume={"rpm": 60})
        assert limiter.wait_time("k", [rpm, tpm], consume={"tpm": 500}) == 1.0
        clock.advance(0.25)
        assert limiter.wait_time("k", [rpm]) == 0.75
        assert limiter.available("k", [rpm]) == {"rpm": 0.25}  # refilled, nothing charged
