"""AsyncLimiter over AsyncRedisStore (real redis-server) and over MemoryStore."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from taskthrottle import (
    AsyncLimiter,
    AsyncRedisStore,
    InvalidInput,
    Limit,
    MemoryStore,
    Throttled,
)
from taskthrottle._entries import entries
from taskthrottle.testing import ManualClock

rpm = Limit.per_minute("rpm", 60)
tpm = Limit.per_minute("tpm", 1000)
conc = Limit.concurrency("conc", 1)

Scenario = Callable[[AsyncLimiter], Coroutine[Any, Any, None]]


@pytest.fixture(params=["memory", "redis"])
def run(request: pytest.FixtureRequest, clock: ManualClock) -> Callable[[Scenario], None]:
    """Runs a scenario against an AsyncLimiter of each kind, closing its pool afterwards."""

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            if request.param == "memory":
                await scenario(AsyncLimiter(MemoryStore(clock=clock)))
                return
            url = request.getfixturevalue("redis_url")
            ns = request.getfixturevalue("namespace")
            store = AsyncRedisStore.from_url(url, namespace=ns, clock=clock)
            try:
                await scenario(AsyncLimiter(store))
            finally:
                await store.aclose()

        asyncio.run(main())

    return go


def test_acquire_adjust_release(run: Callable[[Scenario], None]) -> None:
    """The documented cycle, awaited: acquire, adjust, release, read back."""

    async def scenario(limiter: AsyncLimiter) -> None:
        async with await limiter.acquire("k", [rpm, tpm, conc], consume={"tpm": 100}) as lease:
            await lease.adjust(tpm=50)
            assert lease.consumed == {"rpm": 1.0, "tpm": 150.0}
            with pytest.raises(Throttled) as info:
                await limiter.acquire("k", [conc])
            assert info.value.violations[0].limit == "conc"
        assert await limiter.available("k", [rpm, tpm, conc]) == {
            "rpm": 59.0,
            "tpm": 850.0,
            "conc": 1.0,
        }

    run(scenario)


def test_reservations_and_reset(run: Callable[[Scenario], None]) -> None:
    """Turns queue in order; a cancel frees one; reset empties the key."""

    async def scenario(limiter: AsyncLimiter) -> None:
        per_second = Limit.per_second("rps", 1)
        first = await limiter.reserve("k", [per_second])
        second = await limiter.reserve("k", [per_second])
        assert (first.delay, second.delay) == (0.0, 1.0)
        await second.cancel()
        with pytest.raises(InvalidInput):
            second.redeem()
        assert (await limiter.reserve("k", [per_second])).delay == 1.0
        with pytest.raises(Throttled):
            await limiter.reserve("k", [per_second], max_wait=0.5)
        await limiter.reset("k")
        assert await limiter.available("k", [per_second]) == {"rps": 1.0}

    run(scenario)


def test_renew_holds_slots_longer(run: Callable[[Scenario], None], clock: ManualClock) -> None:
    """A renewal, awaited, keeps a slot held past its first expiry; a released one is gone."""

    async def scenario(limiter: AsyncLimiter) -> None:
        held = await limiter.acquire("k", [conc], ttl=10)
        gone = await limiter.acquire("other", [conc], ttl=10, lease_id="other")
        await gone.release()
        clock.advance(8)
        slot = entries("k", [conc], None)
        leases = [(held.id, slot), ("other", entries("other", [conc], None))]
        assert await limiter.store.renew(leases, 10_000) == [True, False]
        clock.advance(4)
        with pytest.raises(Throttled) as info:
            await limiter.acquire("k", [conc])
        assert info.value.retry_after == 6.0

    run(scenario)


def test_many_tasks_share_one_bucket(run: Callable[[Scenario], None]) -> None:
    """Fifty concurrent coroutines: exactly the capacity is granted."""

    async def scenario(limiter: AsyncLimiter) -> None:
        async def one() -> bool:
            try:
                await limiter.acquire("k", [Limit.per_hour("h", 20)])
            except Throttled:
                return False
            return True

        results = await asyncio.gather(*(one() for _ in range(50)))
        assert sum(results) == 20

    run(scenario)
