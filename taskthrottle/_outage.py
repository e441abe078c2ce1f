"""What a limiter does while its store fails: the outage state every caller shares.

After a store call fails, the store is left alone for `PROBE_EVERY` seconds: calls in
between fail at once instead of each waiting out socket timeouts, and a single call then
probes it again. An outage logs one ERROR line when it starts and one INFO line when the
store answers again, with how long it lasted and what was done meanwhile; nothing per
call in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from taskthrottle._entries import CONCURRENCY, Entry
from taskthrottle._exceptions import InvalidInput, StoreError
from taskthrottle._store import AsyncStore, BreakerReply, BreakerSpec, Outcome, Store

log = logging.getLogger("taskthrottle")

Policy = Literal["defer", "allow", "local"]
POLICIES: tuple[Policy, ...] = ("defer", "allow", "local")

#: Seconds between probes of a store that failed.
PROBE_EVERY = 1.0

T = TypeVar("T")


def check_policy(policy: object, local_share: float | None) -> Policy:
    """Return ``policy`` if it is one of `POLICIES` and, for "local", has a share to use."""
    if policy not in POLICIES:
        raise InvalidInput(f"on_store_error must be one of {POLICIES}, got {policy!r}")
    if policy == "local" and local_share is None:
        msg = "on_store_error='local' needs local_share: the part of each limit one process takes"
        raise InvalidInput(msg)
    if local_share is not None and not (
        isinstance(local_share, (int, float)) and 0 < local_share <= 1
    ):
        raise InvalidInput(f"local_share must be above 0 and at most 1, got {local_share!r}")
    return policy


class Outage:
    """Whether the store is down, since when, and what callers did meanwhile."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None
        self._probe_at = 0.0
        self.decisions: Counter[str] = Counter()

    def may_call(self) -> bool:
        """True when the store is up, or when this caller is the one to probe it."""
        if self.since is None:
            return True
        with self._lock:
            now = self._clock()
            if now < self._probe_at:
                return False
            self._probe_at = now + PROBE_EVERY
            return True

    def failed(self, exc: StoreError, policy: str) -> None:
        """A call failed: the outage starts now unless it already has."""
        with self._lock:
            self._probe_at = self._clock() + PROBE_EVERY
            if self.since is not None:
                return
            self.since = self._clock()
            self.decisions.clear()
        log.error(
            "taskthrottle: the store failed (%s); on_store_error=%r until it answers", exc, policy
        )

    def answered(self) -> None:
        """A call succeeded: an outage, if any, is over."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            lasted, self.since = self._clock() - self.since, None
            done = ", ".join(f"{n} {what}" for what, n in sorted(self.decisions.items()))
        log.info(
            "taskthrottle: the store answers again after %.1f s; meanwhile %s",
            lasted,
            done or "nothing asked for it",
        )

    def decided(self, what: str) -> None:
        """Count a request answered without the store ("deferred", "allowed", "local")."""
        self.decisions[what] += 1

    def call(self, policy: str, operation: Callable[[], T]) -> T:
        """Run a store ``operation``, failing at once while the store is down."""
        if not self.may_call():
            raise StoreError(f"the store is unavailable (since {self.down_for():.1f} s)")
        try:
            result = operation()
        except StoreError as exc:
            self.failed(exc, policy)
            raise
        self.answered()
        return result

    async def acall(self, policy: str, operation: Callable[[], Awaitable[T]]) -> T:
        """The asyncio twin of `call`."""
        if not self.may_call():
            raise StoreError(f"the store is unavailable (since {self.down_for():.1f} s)")
        try:
            result = await operation()
        except StoreError as exc:
            self.failed(exc, policy)
            raise
        self.answered()
        return result

    def down_for(self) -> float:
        """Seconds since the outage began (0.0 when there is none)."""
        since = self.since
        return 0.0 if since is None else self._clock() - since


def local_share_of(entries: Sequence[Entry], share: float) -> list[Entry]:
    """Each entry with ``share`` of its capacity and refill, for a process deciding alone;
    never less than one request of its own amount, nor a refill of zero."""
    out = []
    for e in entries:
        cap = max(e.amount, int(e.cap * share))
        if e.kind == CONCURRENCY:
            cap = max(cap, 1000)
        out.append(e._replace(cap=cap, refill=max(1, int(e.refill * share))))
    return out


class GuardedStore:
    """A store whose calls fail at once while an `Outage` says it is down; what leases of
    a `Limiter` settle through, so that a release during an outage costs nothing."""

    def __init__(self, store: Store, outage: Outage, policy: Callable[[], str]) -> None:
        self.store = store
        self.outage = outage
        self._policy = policy

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        return self.outage.call(
            self._policy(), lambda: self.store.acquire(lease_id, entries, max_wait_ms, ttl_ms)
        )

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        self.outage.call(
            self._policy(), lambda: self.store.settle(op_id, lease_id, deltas, release)
        )

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return self.outage.call(self._policy(), lambda: self.store.peek(entries))

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `taskthrottle.Store.renew`."""
        return self.outage.call(self._policy(), lambda: self.store.renew(leases, ttl_ms))

    def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        self.outage.call(self._policy(), lambda: self.store.reset(key))

    def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `taskthrottle.Store.pushback`."""
        self.outage.call(self._policy(), lambda: self.store.pushback(key, hold_ms, remaining))

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """See `taskthrottle.Store.breaker`."""
        return self.outage.call(
            self._policy(), lambda: self.store.breaker(name, op, probe_round, spec)
        )

    def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        self.outage.call(self._policy(), lambda: self.store.reset_breaker(name))


class AsyncGuardedStore:
    """The asyncio twin of `GuardedStore`."""

    def __init__(self, store: AsyncStore, outage: Outage, policy: Callable[[], str]) -> None:
        self.store = store
        self.outage = outage
        self._policy = policy

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        return await self.outage.acall(
            self._policy(), lambda: self.store.acquire(lease_id, entries, max_wait_ms, ttl_ms)
        )

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        await self.outage.acall(
            self._policy(), lambda: self.store.settle(op_id, lease_id, deltas, release)
        )

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return await self.outage.acall(self._policy(), lambda: self.store.peek(entries))

    async def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `taskthrottle.Store.renew`."""
        return await self.outage.acall(self._policy(), lambda: self.store.renew(leases, ttl_ms))

    async def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        await self.outage.acall(self._policy(), lambda: self.store.reset(key))

    async def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `taskthrottle.Store.pushback`."""
        await self.outage.acall(
            self._policy(), lambda: self.store.pushback(key, hold_ms, remaining)
        )

    async def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        """See `taskthrottle.Store.breaker`."""
        return await self.outage.acall(
            self._policy(), lambda: self.store.breaker(name, op, probe_round, spec)
        )

    async def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        await self.outage.acall(self._policy(), lambda: self.store.reset_breaker(name))


class NoStore:
    """Where a lease granted without the store (``on_store_error="allow"``) settles: nowhere."""

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """Grants everything."""
        return Outcome(True, 0, round(time.time() * 1000))

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """Changes nothing."""

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """Every entry full."""
        return [e.cap for e in entries]

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """Every lease held."""
        return [True for _ in leases]

    def reset(self, key: str) -> None:
        """Changes nothing."""

    def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """Changes nothing."""

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """Every breaker closed, letting every call through."""
        return BreakerReply(1, 0, 0, 0, 0, 0, 0, 0, -1, round(time.time() * 1000))

    def reset_breaker(self, name: str) -> None:
        """Changes nothing."""


class AsyncNoStore:
    """The asyncio twin of `NoStore`."""

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """Grants everything."""
        return NO_STORE.acquire(lease_id, entries, max_wait_ms, ttl_ms)

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """Changes nothing."""

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        """Every entry full."""
        return NO_STORE.peek(entries)

    async def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """Every lease held."""
        return NO_STORE.renew(leases, ttl_ms)

    async def reset(self, key: str) -> None:
        """Changes nothing."""

    async def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """Changes nothing."""

    async def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        """Every breaker closed."""
        return NO_STORE.breaker(name, op, probe_round, spec)

    async def reset_breaker(self, name: str) -> None:
        """Changes nothing."""


NO_STORE = NoStore()
ASYNC_NO_STORE = AsyncNoStore()
