"""A worker node is SIGKILLed (main process and children) while a concurrency=1 task holds
its slot, mid-body: the task is delivered again and runs to its end, and no two bodies
ever hold the slot at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import FRAMEWORKS
from tests.faults.scenario import Run
from tests.faults.servers import RedisServer

TASKS = 12
VICTIM = "guarded-004"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_worker_killed_holding_the_slot(
    framework: str,
    run: Callable[..., Run],
    store_redis: RedisServer,
    broker_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """Two nodes; acks_late and reject_on_worker_lost (Celery, with a visibility timeout of
    8 s so that the survivor restores the dead node's messages), a 3 s heartbeat timeout
    (Dramatiq); slots of dead holders expire after 3 s. The victim's body hangs until its
    node is killed, so it legitimately starts twice; nothing else may."""
    marker = tmp_path / "victim-started"
    scenario = run(
        framework,
        broker_redis,
        store_redis,
        TT_ACKS_LATE="1",
        TT_VISIBILITY="8",
        TT_HEARTBEAT="3000",
        TT_LEASE_TTL="3",
        TT_HANG_KEY=VICTIM,
        TT_HANG_MARKER=str(marker),
    )
    scenario.start(nodes=2)
    scenario.send("guarded", TASKS, 0.3)
    scenario.wait_for(marker.exists, 40, f"{VICTIM} to start")
    (holder,) = [e.pid for e in scenario.events() if e.kind == "start" and e.key == VICTIM]
    scenario.kill(scenario.fleet.owner_of(holder))
    print(scenario.finish())
    scenario.verify(cap=1, killed_mid_body={VICTIM})
