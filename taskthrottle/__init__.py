"""taskthrottle: one rate limit across a whole fleet of Celery and Dramatiq workers.

The public API is what this module exports; everything in underscored modules is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskthrottle._breaker import Breaker, BreakerState
from taskthrottle._entries import Entry
from taskthrottle._exceptions import (
    BreakerOpen,
    InvalidInput,
    InvalidType,
    MissingDependency,
    RequestTooLarge,
    StoreError,
    StoreUnavailable,
    TaskThrottleError,
    Throttled,
    Violation,
)
from taskthrottle._lease import AsyncLease, AsyncReservation, Lease, Reservation
from taskthrottle._limiter import AsyncLimiter, Limiter
from taskthrottle._limits import Limit
from taskthrottle._memory import MemoryStore
from taskthrottle._store import AsyncStore, BreakerReply, BreakerSpec, Outcome, Store
from taskthrottle._throttle import EXEMPT, Throttle, current_lease, throttled

if TYPE_CHECKING:
    from taskthrottle._redis import AsyncRedisStore as AsyncRedisStore
    from taskthrottle._redis import RedisStore as RedisStore

__version__ = "0.1.0"

# What every install has: `from taskthrottle import *` never needs the redis extra. The
# Redis stores are imported by name (`from taskthrottle import RedisStore`), on first use.
__all__ = [  # noqa: RUF022  (plainly sorted: tests/test_public_api.py)
    "AsyncLease",
    "AsyncLimiter",
    "AsyncReservation",
    "AsyncStore",
    "Breaker",
    "BreakerOpen",
    "BreakerReply",
    "BreakerSpec",
    "BreakerState",
    "EXEMPT",
    "Entry",
    "InvalidInput",
    "InvalidType",
    "Lease",
    "Limit",
    "Limiter",
    "MemoryStore",
    "MissingDependency",
    "Outcome",
    "RequestTooLarge",
    "Reservation",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TaskThrottleError",
    "Throttle",
    "Throttled",
    "Violation",
    "current_lease",
    "throttled",
]

# Tracebacks, reprs and pickles name the public home of each name, not its private module
# (as httpx does): every name of __all__ that a private module defines.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("taskthrottle._"):
        _obj.__module__ = "taskthrottle"


def __getattr__(name: str) -> Any:
    # The Redis stores import redis-py, an optional extra: load them on first use only.
    if name in ("RedisStore", "AsyncRedisStore"):
        from taskthrottle import _redis

        return getattr(_redis, name)
    raise AttributeError(f"module 'taskthrottle' has no attribute {name!r}")
