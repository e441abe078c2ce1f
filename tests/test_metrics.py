"""Metrics: every acquire and reservation is reported, on every store."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from taskthrottle import (
    AsyncLimiter,
    InvalidInput,
    Limit,
    Limiter,
    RedisStore,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from taskthrottle._store import Store
from taskthrottle.metrics import PrometheusMetrics

rpm = Limit.per_minute("rpm", 2)
tpm = Limit.per_minute("tpm", 100)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_outcomes_and_refusing_limits_are_counted(store: Store) -> None:
    """A grant now, a delayed reservation and a refusal each count once, by outcome."""
    registry = CollectorRegistry()
    limiter = Limiter(store, metrics=PrometheusMetrics(registry))
    limiter.acquire("k", [rpm, tpm], consume={"tpm": 40})
    limiter.reserve("k", [rpm, tpm], consume={"tpm": 20}, max_wait=60)  # rpm has one left
    booked = limiter.reserve("k", [rpm, tpm], consume={"tpm": 10}, max_wait=60)
    assert booked.delay > 0
    with pytest.raises(Throttled):
        limiter.acquire("k", [rpm, tpm], consume={"tpm": 10})

    count = "taskthrottle_requests_total"
    assert sample(registry, count, outcome="granted") == 2
    assert sample(registry, count, outcome="delayed") == 1
    assert sample(registry, count, outcome="throttled") == 1
    assert sample(registry, count, outcome="failed") == 0
    assert sample(registry, "taskthrottle_refusals_total", limit="rpm") == 1
    assert sample(registry, "taskthrottle_refusals_total", limit="tpm") == 0
    assert sample(registry, "taskthrottle_delay_seconds_count") == 3
    assert sample(registry, "taskthrottle_delay_seconds_sum") == pytest.approx(booked.delay)


def test_a_failing_store_is_counted() -> None:
    """A store that cannot be reached counts as failed, and the error still reaches the caller."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    registry = CollectorRegistry()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retries=0, connect_timeout=0.5)
    limiter = Limiter(store, metrics=PrometheusMetrics(registry))
    with pytest.raises(StoreUnavailable) as caught:
        limiter.acquire("k", [rpm])
    assert isinstance(caught.value.cause, StoreError)
    assert sample(registry, "taskthrottle_requests_total", outcome="failed") == 1


def test_the_async_limiter_reports_too() -> None:
    """AsyncLimiter reports as Limiter does."""
    registry = CollectorRegistry()
    limiter = AsyncLimiter(metrics=PrometheusMetrics(registry, prefix="llm"))

    async def run() -> None:
        await limiter.acquire("k", [rpm])
        await limiter.acquire("k", [rpm])
        with pytest.raises(Throttled):
            await limiter.acquire("k", [rpm])

    asyncio.run(run())
    assert sample(registry, "llm_requests_total", outcome="granted") == 2
    assert sample(registry, "llm_requests_total", outcome="throttled") == 1


def test_a_bad_prefix_is_refused() -> None:
    """A prefix Prometheus could not take is named in the error."""
    with pytest.raises(InvalidInput, match="'my-app'"):
        PrometheusMetrics(CollectorRegistry(), prefix="my-app")


def test_without_prometheus_client_the_pip_line_is_named() -> None:
    """The metrics module imports without the extra; using it names the install line."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from taskthrottle.metrics import PrometheusMetrics\n"
        "from taskthrottle import MissingDependency\n"
        "try:\n    PrometheusMetrics()\n"
        "except MissingDependency as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'taskthrottle[prometheus]'" in out.stdout
