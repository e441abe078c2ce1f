"""`EXEMPT` from a key callable, and `strategy=` on the keyword form of `@throttled`:
the request a call makes, the gates of Celery and Dramatiq, and the metrics."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from celery import Celery
from dramatiq.brokers.stub import StubBroker
from prometheus_client import CollectorRegistry

import taskthrottle.celery
from taskthrottle import (
    EXEMPT,
    InvalidInput,
    Limit,
    Limiter,
    MemoryStore,
    current_lease,
    throttled,
)
from taskthrottle._throttle import plan, throttles_of
from taskthrottle.dramatiq import ThrottleMiddleware
from taskthrottle.metrics import PrometheusMetrics
from taskthrottle.testing import ManualClock

INTERNAL = {"ops", "billing"}


def tenant_key(tenant: str, tokens: int = 1) -> Any:
    """Internal tenants are exempt from per-tenant limits."""
    return EXEMPT if tenant in INTERNAL else f"tenant:{tenant}"


@throttled(rpm=60, tpm=1_000, key=tenant_key, consume={"tpm": lambda tenant, tokens=1: tokens})
@throttled(tpm=100_000, key="openai")
def call(tenant: str, tokens: int = 1) -> str:
    return tenant


class NoStore(MemoryStore):
    """A store that fails the test when called at all."""

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the store was called")

    settle = peek = renew = reset = pushback = acquire


class TestPlan:
    def test_an_exempt_throttle_is_skipped_and_the_others_charged(self) -> None:
        """The tenant throttle said EXEMPT: the openai pool is still charged, with the
        consume the tenant throttle declared for the name both carry."""
        ask = plan(throttles_of(call), call, ("ops",), {"tokens": 7}, "call")
        assert {k: [lim.name for lim in v] for k, v in ask.target.items()} == {"openai": ["tpm"]}
        assert ask.consume == {"tpm": 7}
        assert ask.exempt == {"rpm"}  # tpm is charged on openai: not exempt

    def test_a_task_exempt_from_every_throttle_has_no_target(self) -> None:
        @throttled(rpm=60, key=tenant_key, breaker="upstream")
        def job(tenant: str) -> None: ...

        ask = plan(throttles_of(job), job, ("billing",), {}, "job")
        assert (ask.target, ask.consume, ask.breakers) == ({}, {}, ())
        assert ask.exempt == {"rpm"}
        other = plan(throttles_of(job), job, ("acme",), {}, "job")
        assert list(other.target) == ["tenant:acme"] and other.breakers == ("upstream",)

    def test_exempt_is_one_object_even_pickled(self) -> None:
        assert pickle.loads(pickle.dumps(EXEMPT)) is EXEMPT
        assert repr(EXEMPT) == "EXEMPT"


class TestLimiter:
    def test_an_exempt_lease_calls_no_store_and_is_counted(self) -> None:
        """Limiter.exempt: no store call, adjust of an exempt limit a no-op, release free,
        counted as exempt."""
        registry = CollectorRegistry()
        limiter = Limiter(NoStore(), metrics=PrometheusMetrics(registry))
        lease = limiter.exempt({"tpm"})
        lease.adjust(tpm=500)
        with pytest.raises(InvalidInput, match="does not hold"):
            lease.adjust(rpm=1)
        lease.release()
        assert lease.consumed == {}
        sample = registry.get_sample_value("taskthrottle_requests_total", {"outcome": "exempt"})
        assert sample == 1

    def test_metrics_without_an_exempt_method_still_work(self) -> None:
        class Old:
            def granted(self, delay: float) -> None: ...
            def throttled(self, exc: Exception) -> None: ...
            def failed(self, exc: Exception) -> None: ...

        Limiter(NoStore(), metrics=Old()).exempt()


class TestStrategyKeyword:
    def test_keyword_limits_take_the_strategy(self) -> None:
        @throttled(rph=5000, concurrency=2, strategy="fixed_window")
        def job() -> None: ...

        (spec,) = throttles_of(job)
        assert [(lim.name, lim.kind) for lim in spec.limits] == [
            ("rph", "fixed_window"),
            ("concurrency", "concurrency"),
        ]
        assert spec.limits[0] == Limit.per_hour("rph", 5000, strategy="fixed_window")

    def test_a_bad_strategy_names_the_choices(self) -> None:
        with pytest.raises(InvalidInput, match="'token_bucket', 'fixed_window', 'sliding_window'"):
            throttled(rpm=5, strategy="gcra")  # type: ignore[arg-type]

    def test_a_strategy_without_keyword_limits_is_refused(self) -> None:
        with pytest.raises(InvalidInput, match="applies to keyword limits"):
            throttled(Limit.per_minute("r", 5), strategy="sliding_window")


def make_app(**conf: Any) -> Celery:
    app = Celery("exempt", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, **conf)
    return app


def test_celery_runs_an_exempt_task_with_no_store_call() -> None:
    """Eager Celery: the internal tenant runs with a lease of no limits and no store call;
    its body's adjust of an exempt limit is a no-op."""
    registry = CollectorRegistry()
    app = make_app()
    taskthrottle.celery.install(app, Limiter(NoStore(), metrics=PrometheusMetrics(registry)))

    @app.task(shared=False)  # type: ignore[untyped-decorator]
    @throttled(tpm=1000, key=tenant_key)
    def job(tenant: str) -> dict[str, float]:
        lease = current_lease()
        assert lease is not None
        lease.adjust(tpm=250)
        return lease.consumed

    assert job.delay("ops").get() == {}
    assert registry.get_sample_value("taskthrottle_requests_total", {"outcome": "exempt"}) == 1


def test_celery_charges_what_is_not_exempt() -> None:
    """A tenant that is not internal, or the shared pool of an internal one, is charged."""
    limiter = Limiter(MemoryStore(clock=ManualClock()))
    app = make_app()
    taskthrottle.celery.install(app, limiter)
    task = app.task(shared=False)(call)
    assert task.delay("ops", 7).get() == "ops"
    assert task.delay("acme", 3).get() == "acme"
    tpm = Limit.per_minute("tpm", 100_000)
    assert limiter.available("openai", [tpm]) == {"tpm": 99_990.0}
    assert limiter.available("tenant:acme", [Limit.per_minute("tpm", 1_000)]) == {"tpm": 997.0}


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


def test_dramatiq_runs_an_exempt_message_with_no_store_call(broker: StubBroker) -> None:
    """The middleware lets an exempt message through without a store call; others pay, in
    a fixed window given by the actor option's strategy."""
    registry = CollectorRegistry()
    seen: list[dict[str, float]] = []
    limiter = Limiter(MemoryStore(clock=ManualClock()), metrics=PrometheusMetrics(registry))
    broker.add_middleware(ThrottleMiddleware(limiter))

    @dramatiq.actor(
        throttle={"rph": 100, "key": tenant_key, "strategy": "fixed_window"}, max_retries=0
    )
    def job(tenant: str) -> None:
        lease = current_lease()
        assert lease is not None
        seen.append(lease.consumed)

    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        job.send("ops")
        job.send("acme")
        broker.join(job.queue_name)
        worker.join()
    finally:
        worker.stop()
    assert sorted(seen, key=len) == [{}, {"rph": 1.0}]
    rph = Limit.per_hour("rph", 100, strategy="fixed_window")
    assert limiter.available("tenant:acme", [rph]) == {"rph": 99.0}
    assert registry.get_sample_value("taskthrottle_requests_total", {"outcome": "exempt"}) == 1
