"""Circuit breakers: every transition on a manual clock, over every store (MemoryStore,
RedisStore, fakeredis), plus the ways to call through one and its configuration."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from taskthrottle import (
    AsyncLimiter,
    Breaker,
    BreakerOpen,
    InvalidInput,
    InvalidType,
    Limiter,
    MemoryStore,
    RedisStore,
    StoreError,
    Throttled,
    Violation,
)
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock


class Down(ConnectionError):
    """The callee failed."""


def fail() -> None:
    raise Down("callee down")


def ok() -> str:
    return "ok"


@pytest.fixture
def make(limiter: Limiter) -> Callable[..., Breaker]:
    """Makes breakers of a name of their own on the test's limiter (and clock)."""

    def build(**options: Any) -> Breaker:
        options = {"failure_threshold": 3, "recovery_timeout": 60.0, **options}
        return Breaker(f"cb-{uuid.uuid4().hex[:8]}", limiter, **options)

    return build


def failures(breaker: Breaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Down):
            breaker.call(fail)


def refusal(breaker: Breaker) -> BreakerOpen:
    with pytest.raises(BreakerOpen) as info:
        breaker.call(ok)
    return info.value


class TestClosed:
    def test_opens_on_the_failure_that_reaches_the_threshold(self, make: Any) -> None:
        """Two failures of three leave it closed; the third opens it, and the next call is
        refused with the whole recovery timeout to wait."""
        breaker = make()
        failures(breaker, 2)
        assert breaker.state()[:4] == (breaker.name, "closed", 2, 2)
        assert breaker.call(ok) == "ok"
        failures(breaker, 1)
        exc = refusal(breaker)
        assert (exc.retry_after, exc.state, exc.breaker) == (60.0, "open", breaker.name)
        assert exc.violations == (Violation(breaker.name, "breaker open", 60.0),)
        assert isinstance(exc, Throttled)

    def test_failures_slide_out_of_the_window(self, make: Any, clock: ManualClock) -> None:
        """Failures older than the window no longer count towards the threshold."""
        breaker = make(window=10.0)
        failures(breaker, 2)
        clock.advance(10.0)
        assert breaker.state().failures == 0
        failures(breaker, 2)
        assert breaker.state().state == "closed"
        failures(breaker, 1)
        assert breaker.state().state == "open"

    def test_failure_rate_over_minimum_calls(self, make: Any) -> None:
        """A rate rule waits for minimum_calls, then opens at the rate."""
        breaker = make(failure_threshold=None, failure_rate=0.5, minimum_calls=4)
        failures(breaker, 3)  # 3 of 3: over the rate, but too few calls
        assert breaker.state().state == "closed"
        breaker.call(ok)  # 3 of 4 = 75 %
        failures(breaker, 1)  # the failure that is counted with the rate reached opens
        assert breaker.state().state == "open"

    def test_which_exceptions_count(self, make: Any) -> None:
        """Ignored exceptions and refusals count for nothing; others than the failure
        exceptions count as successes."""
        breaker = make(failure_exceptions=(Down,), ignore_exceptions=(KeyError,))

        def raising(exc: BaseException) -> None:
            raise exc

        for exc in (KeyError("x"), Throttled(1.0, ()), ValueError("not the callee")):
            with pytest.raises(type(exc)):
                breaker.call(raising, exc)
        state = breaker.state()
        assert (state.calls, state.failures) == (1, 0)  # the ValueError, as a success


class TestOpenAndHalfOpen:
    def test_half_open_admits_the_probe_budget_then_refuses(
        self, make: Any, clock: ManualClock
    ) -> None:
        """After the recovery timeout exactly half_open_max_calls calls pass at once; the
        next is refused as half-open, polling at the probe timeout."""
        breaker = make(half_open_max_calls=2, probe_timeout=5.0)
        failures(breaker, 3)
        clock.advance(59.999)
        assert refusal(breaker).retry_after == pytest.approx(0.001)
        clock.advance(0.001)
        assert breaker.state().state == "half-open"
        rounds = [breaker.enter(), breaker.enter()]
        exc = refusal(breaker)
        assert (exc.state, exc.retry_after) == ("half-open", 5.0)
        assert breaker.state()[1:] == ("half-open", 0, 0, 2, 0, 5.0)
        breaker.leave(rounds[0])
        assert breaker.state().state == "closed"

    def test_success_threshold_probes_close_it(self, make: Any, clock: ManualClock) -> None:
        """With success_threshold=2 one good probe is not enough; the second closes it with
        an empty window."""
        breaker = make(success_threshold=2, half_open_max_calls=1)
        failures(breaker, 3)
        clock.advance(60)
        breaker.call(ok)
        assert breaker.state()[1:] == ("half-open", 0, 0, 0, 1, 0.0)
        breaker.call(ok)
        assert breaker.state()[1:] == ("closed", 0, 0, 0, 0, 0.0)

    def test_a_failed_probe_reopens_with_a_fresh_timer(self, make: Any, clock: ManualClock) -> None:
        """A probe that fails opens the breaker again for the whole recovery timeout."""
        breaker = make()
        failures(breaker, 3)
        clock.advance(61)
        failures(breaker, 1)
        assert refusal(breaker).retry_after == 60.0

    def test_a_late_outcome_does_not_move_the_breaker(self, make: Any, clock: ManualClock) -> None:
        """A call let through while closed that fails once the breaker is open neither
        restarts the timer nor counts as a probe."""
        breaker = make()
        slow = breaker.enter()
        failures(breaker, 3)
        clock.advance(30)
        breaker.leave(slow, Down())
        assert refusal(breaker).retry_after == 30.0
        clock.advance(30)
        probe = breaker.enter()
        breaker.leave(slow, Down())  # still not a probe's outcome
        assert breaker.state().state == "half-open"
        breaker.leave(probe)
        assert breaker.state().state == "closed"

    def test_a_lost_probe_frees_its_slot(self, make: Any, clock: ManualClock) -> None:
        """A probe never reported (its worker died) stops counting after probe_timeout."""
        breaker = make(probe_timeout=10.0)
        failures(breaker, 3)
        clock.advance(60)
        breaker.enter()  # never left
        assert refusal(breaker).retry_after == 10.0
        clock.advance(10)
        assert breaker.call(ok) == "ok"
        assert breaker.state().state == "closed"

    def test_a_late_report_of_a_lost_probe_changes_nothing(
        self, make: Any, clock: ManualClock
    ) -> None:
        """A probe that ran past probe_timeout counts as lost: its report, late, neither
        counts nor frees the slot of the probe let through in its place, so no third probe
        runs beside that one."""
        breaker = make(half_open_max_calls=1, success_threshold=2, probe_timeout=10.0)
        failures(breaker, 3)
        clock.advance(60)
        slow = breaker.enter()
        clock.advance(10)  # slow counts as lost
        second = breaker.enter()
        breaker.leave(slow)  # late: dropped
        assert breaker.state()[1:6] == ("half-open", 0, 0, 1, 0)
        assert refusal(breaker).state == "half-open"
        breaker.leave(second)
        assert breaker.state()[1:6] == ("half-open", 0, 0, 0, 1)

    def test_a_dead_probe_frees_its_slot_while_others_come_and_go(
        self, make: Any, clock: ManualClock
    ) -> None:
        """Each probe has a deadline of its own: a dead prober's slot is free probe_timeout
        after it was let through, however many probes passed since."""
        breaker = make(half_open_max_calls=2, success_threshold=5, probe_timeout=10.0)
        failures(breaker, 3)
        clock.advance(60)
        breaker.enter()  # its worker dies
        clock.advance(6)
        assert breaker.call(ok) == "ok"
        clock.advance(4)  # the dead probe is lost now
        rounds = [breaker.enter(), breaker.enter()]
        assert breaker.state()[1:6] == ("half-open", 0, 0, 2, 1)
        exc = refusal(breaker)
        assert exc.retry_after == 10.0
        for probe_round in rounds:
            breaker.leave(probe_round)
        assert breaker.state()[1:6] == ("half-open", 0, 0, 0, 3)

    def test_each_probe_reports_once(self, make: Any, clock: ManualClock) -> None:
        """A probe's second report, or one naming no probe, moves nothing."""
        breaker = make(half_open_max_calls=2, success_threshold=2)
        failures(breaker, 3)
        clock.advance(60)
        first, second = breaker.enter(), breaker.enter()
        assert first != second
        breaker.leave(first)
        breaker.leave(first)
        breaker.leave(first + second)
        assert breaker.state()[1:6] == ("half-open", 0, 0, 1, 1)
        breaker.leave(second)
        assert breaker.state().state == "closed"


class TestSharedState:
    def test_a_new_breaker_neither_resets_nor_reopens(
        self, limiter: Limiter, make: Any, clock: ManualClock
    ) -> None:
        """A second Breaker under the same name (a process that starts) sees the open
        state and its timer as they are, and writes nothing."""
        breaker = make()
        failures(breaker, 3)
        clock.advance(20)
        again = Breaker(breaker.name, limiter, failure_threshold=3, recovery_timeout=60.0)
        assert refusal(again).retry_after == 40.0
        assert refusal(breaker).retry_after == 40.0

    def test_a_new_breaker_writes_nothing(self, limiter: Limiter, store: Store) -> None:
        """Making a breaker stores nothing: a breaker without state is closed."""
        breaker = Breaker(f"cb-{uuid.uuid4().hex[:8]}", limiter)
        assert breaker.state()[1:] == ("closed", 0, 0, 0, 0, 0.0)
        if isinstance(store, RedisStore):
            assert store.client.exists(store._codec.breaker_key(breaker.name)) == 0
        else:
            assert isinstance(store, MemoryStore)
            assert breaker.name not in store._breakers._fields

    def test_lost_state_is_closed_and_stays_closed(self, make: Any) -> None:
        """A store that lost an open breaker's state (reset here) has it closed, with an
        empty window: nothing reopens it but new failures."""
        breaker = make()
        failures(breaker, 3)
        breaker.reset()
        assert breaker.state()[1:] == ("closed", 0, 0, 0, 0, 0.0)
        failures(breaker, 2)
        assert breaker.state().state == "closed"

    def test_a_partial_state_counts_from_zero(
        self, make: Any, store: Store, clock: ManualClock
    ) -> None:
        """A stored window slice without its counts (a hash written in part) counts as
        empty rather than failing the store operation."""
        breaker = make(window=10.0)
        current = round(clock() * 1000) // 1000
        if isinstance(store, RedisStore):
            key = store._codec.breaker_key(breaker.name)
            store.client.hset(key, mapping={"s": 0, f"i{current % 10}": current})
            store.client.pexpire(key, 60_000)
        else:
            assert isinstance(store, MemoryStore)
            expiry = round(clock() * 1000) + 60_000
            store._breakers._fields[breaker.name] = ({f"i{current % 10}": current}, expiry)
        failures(breaker, 1)
        assert breaker.state()[1:4] == ("closed", 1, 1)

    def test_every_breaker_key_expires(self, make: Any, store: Store) -> None:
        """The breaker's hash carries a TTL in Redis, open or closed."""
        if not isinstance(store, RedisStore):
            pytest.skip("a Redis key's TTL")
        breaker = make()
        failures(breaker, 1)
        key = store._codec.breaker_key(breaker.name)
        assert 0 < store.client.pttl(key) <= 30_000 + 60_000
        failures(breaker, 2)
        assert store.client.pttl(key) > 60_000


class TestObservability:
    def test_each_transition_is_logged_and_reported_once(
        self, make: Any, clock: ManualClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Opening, half-opening and closing log one line each and reach on_change once,
        however many calls are refused in between."""
        seen: list[tuple[str, str]] = []
        breaker = make(on_change=lambda name, state: seen.append((name, state)))
        with caplog.at_level(logging.INFO, logger="taskthrottle"):
            failures(breaker, 3)
            for _ in range(10):
                refusal(breaker)
            clock.advance(60)
            breaker.call(ok)
        lines = [r.getMessage() for r in caplog.records if "breaker" in r.getMessage()]
        assert [line.split()[-1] for line in lines[1:]] == ["half-open", "closed"]
        assert len(lines) == 3 and "opened" in lines[0]
        assert [state for _, state in seen] == ["open", "half-open", "closed"]

    def test_metrics_hear_transitions_and_refusals(self, store: Store) -> None:
        """A limiter's metrics with the breaker methods get transitions and refusals."""

        class Recording:
            def __init__(self) -> None:
                self.events: list[tuple[str, str]] = []

            def granted(self, delay: float) -> None: ...
            def throttled(self, exc: Throttled) -> None: ...
            def failed(self, exc: StoreError) -> None: ...

            def breaker_changed(self, breaker: str, state: str) -> None:
                self.events.append(("changed", state))

            def breaker_refused(self, breaker: str) -> None:
                self.events.append(("refused", breaker))

        metrics = Recording()
        breaker = Breaker("metered", Limiter(store, metrics=metrics), failure_threshold=1)
        breaker.reset()
        with pytest.raises(Down):
            breaker.call(fail)
        refusal(breaker)
        assert metrics.events == [("changed", "open"), ("refused", "metered")]

    def test_an_observer_that_raises_is_logged_not_passed_on(
        self, store: Store, caplog: pytest.LogCaptureFixture
    ) -> None:
        """on_change and metrics methods that raise never fail the call they observe: the
        call passed (or was refused) all the same, and the error is logged."""

        class Broken:
            def granted(self, delay: float) -> None: ...
            def throttled(self, exc: Throttled) -> None: ...
            def failed(self, exc: StoreError) -> None: ...

            def breaker_changed(self, breaker: str, state: str) -> None:
                raise RuntimeError("metrics down")

            def breaker_refused(self, breaker: str) -> None:
                raise RuntimeError("metrics down")

        def on_change(name: str, state: str) -> None:
            raise RuntimeError("hook down")

        limiter = Limiter(store, metrics=Broken())
        name = f"cb-{uuid.uuid4().hex[:8]}"
        breaker = Breaker(name, limiter, failure_threshold=1, on_change=on_change)
        with caplog.at_level(logging.ERROR, logger="taskthrottle"), pytest.raises(Down):
            breaker.call(fail)  # the failure, not the observers' errors
        assert refusal(breaker).state == "open"
        failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failed) == 3 and all("breaker observer" in line for line in failed)


class TestForms:
    def test_decorator_and_context_manager(self, make: Any) -> None:
        """The decorator keeps the function's result; `with` counts what its body raised."""
        breaker: Breaker = make(failure_threshold=2)

        @breaker
        def double(n: int) -> int:
            return 2 * n

        assert double(21) == 42
        assert double.__name__ == "double"
        with pytest.raises(Down), breaker:
            fail()
        with pytest.raises(Down), breaker:
            fail()
        with pytest.raises(BreakerOpen):
            double(1)

    def test_async_functions(self, make: Any, clock: ManualClock) -> None:
        """Coroutine functions are guarded too: as a decorator and with `async with`."""
        breaker: Breaker = make(failure_threshold=2)

        @breaker
        async def fetch(n: int) -> int:
            if n < 0:
                raise Down("negative")
            return n

        async def scenario() -> None:
            assert await fetch(3) == 3
            with pytest.raises(Down):
                await fetch(-1)
            with pytest.raises(Down):
                async with breaker:
                    raise Down("down")
            with pytest.raises(BreakerOpen):
                await fetch(1)
            assert (await breaker.astate()).state == "open"

        asyncio.run(scenario())

    def test_on_an_async_limiter(self, clock: ManualClock) -> None:
        """A breaker on an AsyncLimiter works in coroutines, and says so when used sync."""
        breaker = Breaker("async-cb", AsyncLimiter(MemoryStore(clock=clock)), failure_threshold=1)

        async def scenario() -> None:
            with pytest.raises(Down):
                async with breaker:
                    raise Down("down")
            with pytest.raises(BreakerOpen):
                await breaker.acall(asyncio.sleep, 0)

        asyncio.run(scenario())
        with pytest.raises(InvalidType, match="AsyncLimiter"):
            breaker.call(ok)

    def test_a_store_that_fails_lets_calls_through(self, clock: ManualClock) -> None:
        """Without its store the breaker passes calls (and counts none): the store failing
        says nothing of the callee."""

        class Failing(MemoryStore):
            def breaker(self, *args: Any) -> Any:
                raise StoreError("down")

        breaker = Breaker("no-store", Limiter(Failing(clock=clock)), failure_threshold=1)
        for _ in range(3):
            with pytest.raises(Down):
                breaker.call(fail)
        assert breaker.call(ok) == "ok"
        assert breaker.state().state == "closed"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"failure_threshold": -1}, "failure_threshold must be at least 1, got -1"),
        ({"failure_threshold": 0}, "got 0"),
        ({"failure_rate": 1.5}, "failure_rate must be above 0 and at most 1, got 1.5"),
        ({"failure_rate": 0.0}, "got 0.0"),
        ({"window": 0}, "window must be between 0.001 s and a year, got 0"),
        ({"recovery_timeout": -5}, "recovery_timeout must be between 0.001 s and a year, got -5"),
        ({"half_open_max_calls": 0}, "half_open_max_calls must be at least 1, got 0"),
        ({"success_threshold": -2}, "success_threshold must be at least 1, got -2"),
        ({"minimum_calls": 0}, "minimum_calls must be at least 1, got 0"),
        ({"probe_timeout": float("nan")}, "probe_timeout must be between"),
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any], named: str) -> None:
    """Each bad value is refused with an InvalidInput that names it."""
    with pytest.raises(InvalidInput) as info:
        Breaker("bad", Limiter(), **options)
    assert named in str(info.value)


def test_bad_types_are_refused() -> None:
    """Wrong types are InvalidType: a limiter, exception classes, whole numbers."""
    with pytest.raises(InvalidType):
        Breaker("bad", object())  # type: ignore[arg-type]
    with pytest.raises(InvalidType):
        Breaker("bad", Limiter(), failure_exceptions=("oops",))  # type: ignore[arg-type]
    with pytest.raises(InvalidType):
        Breaker("bad", Limiter(), failure_threshold=2.5)  # type: ignore[arg-type]


def test_prometheus_counts_transitions_and_refusals() -> None:
    """PrometheusMetrics keeps the breaker series, labelled by breaker and state."""
    from prometheus_client import CollectorRegistry

    from taskthrottle.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    limiter = Limiter(MemoryStore(), metrics=PrometheusMetrics(registry))
    breaker = Breaker("prom", limiter, failure_threshold=1)
    with pytest.raises(Down):
        breaker.call(fail)
    refusal(breaker)
    refusal(breaker)
    labels = {"breaker": "prom", "state": "open"}
    assert registry.get_sample_value("taskthrottle_breaker_transitions_total", labels) == 1.0
    refused = registry.get_sample_value("taskthrottle_breaker_refusals_total", {"breaker": "prom"})
    assert refused == 2.0


def test_async_redis_store(redis_url: str, namespace: str, clock: ManualClock) -> None:
    """On an AsyncRedisStore the breaker and pushback take the same steps."""
    from taskthrottle import AsyncRedisStore, Limit

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, namespace=namespace, clock=clock)
        limiter = AsyncLimiter(store)
        breaker = Breaker("async-redis", limiter, failure_threshold=1, recovery_timeout=5.0)
        with pytest.raises(Down):
            await breaker.acall(asyncio.to_thread, fail)
        with pytest.raises(BreakerOpen) as info:
            await breaker.acall(asyncio.sleep, 0)
        assert info.value.retry_after == 5.0
        clock.advance(5)
        await breaker.acall(asyncio.sleep, 0)
        assert (await breaker.astate()).state == "closed"
        rpm = Limit.per_minute("rpm", 60)
        await limiter.pushback("k", 3.0)
        with pytest.raises(Throttled) as held:
            await limiter.acquire("k", [rpm])
        assert held.value.retry_after == 3.0
        await store.aclose()

    asyncio.run(scenario())
