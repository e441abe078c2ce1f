"""The sync and async twins offer the same public methods, so that neither drifts."""

from __future__ import annotations

import pytest

from taskthrottle import (
    AsyncLease,
    AsyncLimiter,
    AsyncReservation,
    AsyncStore,
    Lease,
    Limiter,
    Reservation,
    Store,
)
from taskthrottle._redis import AsyncRedisStore, RedisStore

#: Names that differ by design: the async twin of ``close`` is ``aclose``, as in
#: redis-py's asyncio client and contextlib.
RENAMED = {"close": "aclose"}
#: Sync only by design: where the (sync) worker integrations park tasks, and the waiting
#: rooms they keep their waiting tasks in.
SYNC_ONLY = {"deferrals", "join", "admit", "admitted", "waiting"}


def public(cls: type) -> set[str]:
    """Public attribute names of ``cls``, async spellings mapped to their sync twin's."""
    back = {v: k for k, v in RENAMED.items()}
    return {back.get(name, name) for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize(
    ("sync", "asynchronous"),
    [
        (Limiter, AsyncLimiter),
        (Lease, AsyncLease),
        (Reservation, AsyncReservation),
        (Store, AsyncStore),
        (RedisStore, AsyncRedisStore),
    ],
    ids=lambda cls: cls.__name__,
)
def test_twins_have_the_same_public_methods(sync: type, asynchronous: type) -> None:
    """Every public name of one twin exists on the other."""
    assert public(sync) - public(asynchronous) - SYNC_ONLY == set(), "missing on the async twin"
    assert public(asynchronous) - public(sync) == set(), "missing on the sync twin"
