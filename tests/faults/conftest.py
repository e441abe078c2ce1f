"""Fixtures of the fault suite: redis-servers of its own, proxies, fleets of real workers,
and `run`, which puts one scenario's pieces together. Everything a fixture starts, it stops."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.drivers import Driver, driver_for
from tests.faults.fleet import Fleet
from tests.faults.scenario import Run
from tests.faults.servers import Proxy, RedisServer

FRAMEWORKS = ["celery", "dramatiq"]


@pytest.fixture
def store_redis(servers: Callable[..., RedisServer]) -> RedisServer:
    """The limiter's store; restarts empty."""
    return servers("store")


@pytest.fixture
def broker_redis(servers: Callable[..., RedisServer]) -> RedisServer:
    """The broker, separate from the store; durable (AOF), so that a restart loses no
    message and a lost task is the integration's doing, not the broker's."""
    return servers("broker", aof=True)


@pytest.fixture
def shared_redis(servers: Callable[..., RedisServer]) -> RedisServer:
    """One durable server for both broker and store."""
    return servers("shared", aof=True)


@pytest.fixture
def proxy() -> Iterator[Callable[[RedisServer], Proxy]]:
    """Makes a Proxy in front of a server; stops them all."""
    made: list[Proxy] = []

    def make(server: RedisServer) -> Proxy:
        made.append(Proxy(server.port))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.fixture
def fleet(tmp_path: Path, servers: Callable[..., RedisServer]) -> Iterator[Callable[..., Fleet]]:
    """Makes fleets, each with its own namespace, queue and journal; stops their workers
    (before the servers, which this fixture outlives)."""
    made: list[Fleet] = []

    def make(broker: str, store: str, **env: str) -> Fleet:
        ns = f"ttf-{uuid.uuid4().hex[:10]}"
        base = tmp_path / ns
        (base / "journal").mkdir(parents=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("TT_")}
        full |= {"TT_BROKER": broker, "TT_STORE": store, "TT_NS": ns, "TT_QUEUE": ns}
        full |= {"TT_JOURNAL": str(base / "journal"), **env}
        made.append(Fleet(full, base))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.fixture
def run(fleet: Callable[..., Fleet]) -> Iterator[Callable[..., Run]]:
    """Makes a scenario run: ``run(framework, broker, store, store_url=None, **env)``."""
    drivers: list[Driver] = []

    def make(
        framework: str,
        broker: RedisServer,
        store: RedisServer,
        store_url: str | None = None,
        **env: str,
    ) -> Run:
        workers = fleet(broker.url(), store_url or store.url(), **env)
        drivers.append(driver_for(framework, workers.env))
        return Run(drivers[-1], workers, broker, store)

    yield make
    for driver in drivers:
        driver.close()
