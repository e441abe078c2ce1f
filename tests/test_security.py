"""The Redis user docs/security.md shows confines an app to its namespace, and suffices."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from taskthrottle import Limit, Limiter, RedisStore, StoreUnavailable
from taskthrottle._deferrals import RedisDeferrals
from tests.faults.servers import RedisServer

DOC = Path(__file__).parent.parent / "docs" / "security.md"


def documented_acl() -> list[str]:
    """The ACL SETUSER rule of docs/security.md, as arguments."""
    block = re.search(r"```\n(ACL SETUSER .*?)```", DOC.read_text(), re.S)
    assert block is not None, "docs/security.md shows no ACL SETUSER"
    return block.group(1).split()[2:]


def test_the_documented_acl_runs_everything_in_its_namespace_only(
    servers: Callable[..., RedisServer],
) -> None:
    """As the documented user, an app acquires, adjusts, renews, releases, peeks, resets,
    parks and releases parked tasks in its namespace, and reaches no other."""
    own = servers("acl")
    admin = own.client()
    rule = documented_acl()
    admin.execute_command("ACL", "SETUSER", *rule)  # type: ignore[no-untyped-call]
    user, password = rule[0], rule[2].removeprefix(">")
    url = own.url().replace("redis://", f"redis://{user}:{password}@")
    conc, rps = Limit.concurrency("conc", 2), Limit.per_second("rps", 5)
    limiter = Limiter(RedisStore.from_url(url, namespace=user))
    with limiter.acquire("k", [conc, rps], consume={"rps": 2}) as lease:
        lease.adjust(rps=1)
        limiter.renewer.renew()
    assert limiter.available("k", [conc])["conc"] == 2
    limiter.reset("k")
    parking = RedisDeferrals(redis.Redis.from_url(url), "{" + user + "}", app="celery.billing")
    parking.park("t1", 0, b"payload")
    assert [p.task_id for p in parking.claim(lead=1, batch=10, hold=5).parked] == ["t1"]
    parking.done("t1")
    assert parking.expect("t2", "tok") and parking.begin("t2", "tok")
    intruder = Limiter(RedisStore.from_url(url, namespace="other", retries=0))
    with pytest.raises(StoreUnavailable, match=r"NOPERM|no permissions"):
        intruder.acquire("k", [rps])
