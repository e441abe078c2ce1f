"""The limiter's store fails mid-run (broker healthy and separate): killed and restarted
empty, hung, flushed, or slow to reply. No task may be lost, failed or run twice."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.conftest import FRAMEWORKS
from tests.faults.scenario import Run
from tests.faults.servers import Proxy, RedisServer

TASKS = 30  # 10 at once (the burst), then 5 a second: about 4 s of deferrals
#: What a worker logs when the store fails it (taskthrottle's own log lines, or a task's).
STORE_TROUBLE = r"taskthrottle|Error|error"


def begin(scenario: Run) -> None:
    """Start one node, send the tasks, and wait until the burst ran and the rest are deferred."""
    scenario.start()
    scenario.send("limited", TASKS)
    scenario.wait_for(lambda: scenario.starts() >= 8, 30, "the burst to start")


POLICIES = [
    pytest.param({}, id="defer"),
    pytest.param({"TT_ON_STORE_ERROR": "allow"}, id="allow"),
    pytest.param({"TT_ON_STORE_ERROR": "local", "TT_LOCAL_SHARE": "0.5"}, id="local"),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_store_killed_and_restarted_empty(
    framework: str,
    policy: dict[str, str],
    run: Callable[..., Run],
    store_redis: RedisServer,
    broker_redis: RedisServer,
) -> None:
    """SIGKILL the store while most tasks wait for their turn; 3 s later it is back, empty.
    Under each on_store_error policy."""
    scenario = run(framework, broker_redis, store_redis, **policy)
    begin(scenario)
    store_redis.kill()
    scenario.outage(3.0, STORE_TROUBLE)
    store_redis.restart()
    print(scenario.finish())
    scenario.verify()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_store_hung(
    framework: str, run: Callable[..., Run], store_redis: RedisServer, broker_redis: RedisServer
) -> None:
    """SIGSTOP the store for 4 s: connections stay open, nothing answers (then everything
    the clients sent meanwhile is executed at once)."""
    scenario = run(framework, broker_redis, store_redis)
    begin(scenario)
    store_redis.pause()
    scenario.outage(4.0, STORE_TROUBLE)
    store_redis.resume()
    print(scenario.finish())
    scenario.verify()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_store_flushed(
    framework: str, run: Callable[..., Run], store_redis: RedisServer, broker_redis: RedisServer
) -> None:
    """SCRIPT FLUSH, then a moment later FLUSHALL, on the (suite's own) store mid-run."""
    scenario = run(framework, broker_redis, store_redis)
    begin(scenario)
    with store_redis.client() as client:
        client.script_flush()
        before = scenario.starts()
        scenario.wait_for(lambda: scenario.starts() > before, 10, "a start after SCRIPT FLUSH")
        client.flushall()
    print(scenario.finish())
    scenario.verify()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_store_replies_delayed(
    framework: str,
    run: Callable[..., Run],
    store_redis: RedisServer,
    broker_redis: RedisServer,
    proxy: Callable[[RedisServer], Proxy],
) -> None:
    """The store's replies come 1 s late (twice the socket timeout) for 3 s, through a proxy:
    every call times out after the server has executed it."""
    gate = proxy(store_redis)
    scenario = run(framework, broker_redis, store_redis, store_url=gate.url())
    begin(scenario)
    gate.delay_replies(1.0)
    scenario.outage(3.0, STORE_TROUBLE)
    gate.passthrough()
    print(scenario.finish())
    scenario.verify()
