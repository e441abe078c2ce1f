"""`Limiter`: acquire, reserve, inspect and reset limits over a store."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskthrottle._algorithms import refill_time
from taskthrottle._exceptions import InvalidInput, InvalidType, StoreError, Throttled, Violation
from taskthrottle._lease import AsyncLease, AsyncReservation, Lease, Reservation
from taskthrottle._limits import Limit
from taskthrottle._memory import MemoryStore
from taskthrottle._plan import Consume, Target, check_key, entries, new_id
from taskthrottle._store import BUCKET, QUOTA, AsyncStore, Entry, Outcome, Store

if TYPE_CHECKING:
    from taskthrottle.metrics import Metrics

#: Seconds a concurrency slot stays held when its holder never releases it.
DEFAULT_LEASE_TTL = 300.0


def _seconds(value: float, what: str, *, allow_zero: bool = False) -> int:
    """``value`` seconds as integer milliseconds, refusing what is not a finite duration."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{what} must be a number of seconds, got {value!r}"
        raise InvalidType(msg)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        msg = f"{what} must be a finite number of seconds above zero, got {value!r}"
        raise InvalidInput(msg)
    return math.ceil(value * 1000)


def _request(
    target: Target,
    limits: Sequence[Limit] | None,
    consume: Consume | None,
    ttl: float | None,
    default_ttl_ms: int,
    lease_id: str | None,
) -> tuple[list[Entry], int, str]:
    """The entries, slot ttl (ms) and lease id of a request, all checked."""
    charged = entries(target, limits, consume)
    ttl_ms = default_ttl_ms if ttl is None else _seconds(ttl, "ttl")
    return charged, ttl_ms, new_id() if lease_id is None else check_key(lease_id)


def _answer(outcome: Outcome, charged: list[Entry], metrics: Metrics | None) -> None:
    """Raise `Throttled` for a refusal; report the outcome either way."""
    if outcome.granted:
        if metrics is not None:
            metrics.granted(outcome.delay_ms / 1000)
        return
    violations = tuple(
        Violation(charged[i].key, charged[i].name, wait / 1000) for i, wait in outcome.violations
    )
    exc = Throttled(outcome.delay_ms / 1000, violations)
    if metrics is not None:
        metrics.throttled(exc)
    raise exc


def _wait(charged: list[Entry], levels: list[int], ttl_ms: int) -> float:
    """The wait (seconds) for the whole request, from what each entry has available."""
    waits = [0]
    for e, level in zip(charged, levels, strict=True):
        short = e.amount - level
        if short <= 0:
            continue
        if e.kind == BUCKET:
            waits.append(refill_time(short, e.refill, e.period))
        elif e.kind == QUOTA:
            now = round(time.time() * 1000)
            waits.append((now // e.period + 1) * e.period - now)
        else:
            waits.append(ttl_ms)
    return max(waits) / 1000


def _available(charged: list[Entry], levels: list[int]) -> dict[str, float]:
    return {e.name: level / 1000 for e, level in zip(charged, levels, strict=True)}


class Limiter:
    """Grants leases over a store shared by every worker (or a `MemoryStore` for one process).

    ``lease_ttl`` (seconds) is how long a concurrency slot stays held if its
    holder dies without releasing it. ``metrics`` hears of every acquire and reservation
    (see `taskthrottle.metrics`).
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        metrics: Metrics | None = None,
    ) -> None:
        self.store: Store = MemoryStore() if store is None else store
        self._ttl_ms = _seconds(lease_ttl, "lease_ttl")
        self.metrics = metrics

    def _charge(
        self, lease_id: str, charged: list[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """The store's grant, or `Throttled`."""
        try:
            outcome = self.store.acquire(lease_id, charged, max_wait_ms, ttl_ms)
        except StoreError as exc:
            if self.metrics is not None:
                self.metrics.failed(exc)
            raise
        _answer(outcome, charged, self.metrics)
        return outcome

    def acquire(
        self,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
        *,
        ttl: float | None = None,
        lease_id: str | None = None,
    ) -> Lease:
        """Charge every limit now, all or nothing, or raise `Throttled`.

        ``target`` is a key with ``limits``, or a mapping of keys to their limits.
        ``consume`` maps limit names to amounts (default 1); a name charges every
        key that carries it. Repeating a ``lease_id`` returns the same grant.
        """
        charged, ttl_ms, lease_id = _request(target, limits, consume, ttl, self._ttl_ms, lease_id)
        outcome = self._charge(lease_id, charged, 0, ttl_ms)
        return Lease(self.store, lease_id, charged, outcome.now_ms / 1000)

    def reserve(
        self,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
        *,
        max_wait: float = 60.0,
        ttl: float | None = None,
        lease_id: str | None = None,
    ) -> Reservation:
        """Book the earliest turn within ``max_wait`` seconds, charging now (into debt).

        Raises `Throttled`, charging nothing, when the turn lies further away.
        Concurrency slots and quotas cannot be booked ahead: they must fit now.
        """
        max_wait_ms = _seconds(max_wait, "max_wait", allow_zero=True)
        charged, ttl_ms, lease_id = _request(target, limits, consume, ttl, self._ttl_ms, lease_id)
        outcome = self._charge(lease_id, charged, max_wait_ms, ttl_ms)
        return Reservation(
            self.store, lease_id, charged, outcome.delay_ms / 1000, outcome.now_ms / 1000
        )

    def restore(
        self,
        lease_id: str,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
    ) -> Lease:
        """The lease of an earlier grant or reservation, rebuilt from the same request (in
        the process that runs the task, say); charges nothing."""
        return Lease(self.store, check_key(lease_id), entries(target, limits, consume))

    def available(self, key: str, limits: Sequence[Limit]) -> dict[str, float]:
        """What each limit could grant now (negative when in debt); changes nothing."""
        charged = entries(key, limits, None, default=0)
        return _available(charged, self.store.peek(charged))

    def wait_time(
        self, target: Target, limits: Sequence[Limit] | None = None, consume: Consume | None = None
    ) -> float:
        """Seconds an acquire of this request would wait now (0.0: it would pass); read-only.

        Exact for buckets to the millisecond; a full quota counts until its next reset
        on this machine's clock; a full concurrency limit counts as the lease TTL, the
        longest its holders can keep their slots.
        """
        charged = entries(target, limits, consume)
        return _wait(charged, self.store.peek(charged), self._ttl_ms)

    def reset(self, key: str) -> None:
        """Make every limit under ``key`` full again (and forget its slots)."""
        self.store.reset(check_key(key))


class _AsyncOverSync:
    """Lets an `AsyncLimiter` use a store that never blocks (such as `MemoryStore`)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        return self.store.acquire(lease_id, entries, max_wait_ms, ttl_ms)

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        self.store.settle(op_id, lease_id, deltas, release)

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        return self.store.peek(entries)

    async def reset(self, key: str) -> None:
        self.store.reset(key)


class AsyncLimiter:
    """The asyncio twin of `Limiter`, over an `AsyncRedisStore` or a `MemoryStore`."""

    def __init__(
        self,
        store: AsyncStore | MemoryStore | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        metrics: Metrics | None = None,
    ) -> None:
        self._ttl_ms = _seconds(lease_ttl, "lease_ttl")
        if store is None or isinstance(store, MemoryStore):
            self.store: AsyncStore = _AsyncOverSync(store or MemoryStore())
        else:
            self.store = store
        self.metrics = metrics

    async def _charge(
        self, lease_id: str, charged: list[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `Limiter._charge`."""
        try:
            outcome = await self.store.acquire(lease_id, charged, max_wait_ms, ttl_ms)
        except StoreError as exc:
            if self.metrics is not None:
                self.metrics.failed(exc)
            raise
        _answer(outcome, charged, self.metrics)
        return outcome

    async def acquire(
        self,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
        *,
        ttl: float | None = None,
        lease_id: str | None = None,
    ) -> AsyncLease:
        """See `Limiter.acquire`."""
        charged, ttl_ms, lease_id = _request(target, limits, consume, ttl, self._ttl_ms, lease_id)
        outcome = await self._charge(lease_id, charged, 0, ttl_ms)
        return AsyncLease(self.store, lease_id, charged, outcome.now_ms / 1000)

    async def reserve(
        self,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
        *,
        max_wait: float = 60.0,
        ttl: float | None = None,
        lease_id: str | None = None,
    ) -> AsyncReservation:
        """See `Limiter.reserve`."""
        max_wait_ms = _seconds(max_wait, "max_wait", allow_zero=True)
        charged, ttl_ms, lease_id = _request(target, limits, consume, ttl, self._ttl_ms, lease_id)
        outcome = await self._charge(lease_id, charged, max_wait_ms, ttl_ms)
        return AsyncReservation(
            self.store, lease_id, charged, outcome.delay_ms / 1000, outcome.now_ms / 1000
        )

    async def available(self, key: str, limits: Sequence[Limit]) -> dict[str, float]:
        """See `Limiter.available`."""
        charged = entries(key, limits, None, default=0)
        return _available(charged, await self.store.peek(charged))

    async def reset(self, key: str) -> None:
        """See `Limiter.reset`."""
        await self.store.reset(check_key(key))
