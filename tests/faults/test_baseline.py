"""No fault: the control for every scenario (if this fails, the suite is broken, not the
package)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.conftest import FRAMEWORKS
from tests.faults.scenario import Run
from tests.faults.servers import RedisServer


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_no_fault(
    framework: str,
    run: Callable[..., Run],
    store_redis: RedisServer,
    broker_redis: RedisServer,
) -> None:
    """30 limited and 6 guarded tasks, nothing injected: every check holds."""
    scenario = run(framework, broker_redis, store_redis)
    scenario.start()
    scenario.send("limited", 30)
    scenario.send("guarded", 6, 0.2)
    print(scenario.finish())
    scenario.verify(cap=1)
