"""Fixtures: a manual clock, real redis-servers (the shared one, and ones of a test's own for
what is server-wide), and a `store` over every backend."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from taskthrottle import Limiter, MemoryStore, RedisStore
from taskthrottle._store import Store
from taskthrottle.testing import ManualClock
from tests.faults.servers import RedisServer

REDIS_URL = os.environ.get("TASKTHROTTLE_REDIS_URL", "redis://127.0.0.1:6379/9")
IN_CI = bool(os.environ.get("CI"))


def _redis_answers() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return f"no redis-server answers at {REDIS_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a real redis-server: skipped locally when none answers, an error in CI."""
    problem = _redis_answers()
    if problem:
        if IN_CI:
            pytest.fail(problem + " (CI must run the Redis tests: use scripts/test)")
        pytest.skip(problem)
    return REDIS_URL


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of this test's own; its keys are deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{ns}}}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Makes redis-servers (``aof=True``: nothing lost when killed); stops them all.
    Without a ``redis-server`` on PATH the suite is skipped, and fails in CI."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("the fault suite needs redis-server on PATH")
        pytest.skip("the fault suite needs redis-server on PATH")
    made: list[RedisServer] = []

    def make(name: str, *, aof: bool = False) -> RedisServer:
        made.append(RedisServer(tmp_path / f"redis-{name}", aof=aof))
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when the test says so."""
    return ManualClock()


StoreFactory = Callable[[ManualClock], Store]


@pytest.fixture(params=["memory", "redis", "fakeredis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds a store of each kind (on a clock of the test's choosing)."""
    if request.param == "memory":
        return lambda clock: MemoryStore(clock=clock)
    if request.param == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer()
        return lambda clock: RedisStore(
            fakeredis.FakeRedis(server=server), namespace="fake", clock=clock
        )
    url = request.getfixturevalue("redis_url")
    ns = request.getfixturevalue("namespace")
    return lambda clock: RedisStore.from_url(url, namespace=ns, clock=clock)


@pytest.fixture
def store(make_store: StoreFactory, clock: ManualClock) -> Store:
    """A store of each kind, on the manual clock."""
    return make_store(clock)


@pytest.fixture
def limiter(store: Store) -> Limiter:
    """A limiter over each kind of store, on the manual clock."""
    return Limiter(store)
