"""`Limiter`: acquire, reserve, inspect and reset limits over a store."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from taskthrottle._algorithms import refill_time
from taskthrottle._entries import (
    BUCKET,
    CONCURRENCY,
    FIXED,
    Consume,
    Entry,
    Target,
    check_key,
    entries,
    milli_amount,
    new_id,
)
from taskthrottle._exceptions import (
    InvalidInput,
    InvalidType,
    StoreError,
    StoreUnavailable,
    Throttled,
    Violation,
)
from taskthrottle._lease import AsyncLease, AsyncReservation, Lease, Reservation
from taskthrottle._limits import Limit
from taskthrottle._memory import MemoryStore
from taskthrottle._outage import (
    ASYNC_NO_STORE,
    NO_STORE,
    AsyncGuardedStore,
    GuardedStore,
    Outage,
    Policy,
    check_policy,
    local_share_of,
)
from taskthrottle._renewal import Renewer
from taskthrottle._store import AsyncStore, BreakerReply, BreakerSpec, Outcome, Store

if TYPE_CHECKING:
    from taskthrottle._reports import Metrics

log = logging.getLogger("taskthrottle")

#: Seconds a concurrency slot stays held after its holder stops renewing it (it died, or
#: never released it); a `Limiter` renews its live leases every third of this.
DEFAULT_LEASE_TTL = 60.0


#: The longest a lease may hold its slots unrenewed, or a reservation book ahead, in
#: seconds: state that a caller cannot grow without bound.
MAX_DURATION = 86_400.0


def _seconds(value: float, what: str, *, allow_zero: bool = False) -> int:
    """``value`` seconds as integer milliseconds, refusing what is not a finite duration of
    at most `MAX_DURATION`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{what} must be a number of seconds, got {value!r}"
        raise InvalidType(msg)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        msg = f"{what} must be a finite number of seconds above zero, got {value!r}"
        raise InvalidInput(msg)
    if value > MAX_DURATION:
        msg = f"{what} must be at most {MAX_DURATION:g} seconds (a day), got {value!r}"
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


def _answer(
    outcome: Outcome, charged: list[Entry], metrics: Metrics | None, *, report: bool = True
) -> None:
    """Raise `Throttled` for a refusal; report the outcome (a grant only if ``report``)."""
    if outcome.granted:
        if metrics is not None and report:
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
        elif e.kind == CONCURRENCY:
            waits.append(ttl_ms)
        else:
            # A fixed window fits again once enough windows have started to repay what it
            # is short; a sliding window surely once its count has gone by, a window later.
            now = round(time.time() * 1000)
            windows = -(-short // e.cap) if e.kind == FIXED else -(-(e.cap - level) // e.cap) + 1
            waits.append((now // e.period + windows) * e.period - now)
    return max(waits) / 1000


def _report_exempt(metrics: Metrics | None) -> None:
    """Tell ``metrics`` of an exempt request, when they count those (an ``exempt`` method)."""
    hook = getattr(metrics, "exempt", None)
    if hook is not None:
        hook()


#: Pushbacks longer than `MAX_DURATION`, held for that long: the first is logged.
_capped_holds: list[float] = []


def _say_capped(retry_after: float) -> None:
    if not _capped_holds:
        _capped_holds.append(retry_after)
        log.warning(
            "taskthrottle: a pushback of %.0f s is held for %.0f s, the longest (said once)",
            retry_after,
            MAX_DURATION,
        )


def _pushback(
    key: str,
    retry_after: float | None,
    remaining: Mapping[str, float] | None,
    limits: Sequence[Limit] | None,
) -> tuple[str, int, list[Entry]]:
    """The key, hold (ms) and lowered entries of a pushback, all checked. A hold longer
    than `MAX_DURATION` (a server's Retry-After may say so) holds for that long."""
    key = check_key(key)
    if isinstance(retry_after, (int, float)) and MAX_DURATION < retry_after < math.inf:
        _say_capped(retry_after)
        retry_after = MAX_DURATION
    hold_ms = 0 if retry_after is None else _seconds(retry_after, "retry_after", allow_zero=True)
    if not remaining:
        return key, hold_ms, []
    if limits is None:
        raise InvalidInput("pushback(remaining=...) needs the limits it names (limits=[...])")
    by_name = {e.name: e for e in entries(key, limits, None, default=0)}
    lowered = []
    for name, left in remaining.items():
        e = by_name.get(name)
        if e is None or e.kind == CONCURRENCY:
            known = sorted(n for n, e in by_name.items() if e.kind != CONCURRENCY)
            msg = f"remaining names {name!r}, which is not a bucket or quota of {known}"
            raise InvalidInput(msg)
        milli = milli_amount(left, "remaining[{!r}]", name, signed=True)
        if milli < 0:
            raise InvalidInput(f"remaining[{name!r}] must be at least 0, got {left!r}")
        lowered.append(e._replace(amount=min(milli, e.cap)))
    return key, hold_ms, lowered


def _available(charged: list[Entry], levels: list[int]) -> dict[str, float]:
    return {e.name: level / 1000 for e, level in zip(charged, levels, strict=True)}


def _offline(
    limiter: Limiter | AsyncLimiter,
    exc: StoreError,
    lease_id: str,
    charged: list[Entry],
    max_wait_ms: int,
    ttl_ms: int,
) -> tuple[Outcome, MemoryStore | None]:
    """What ``on_store_error`` makes of a request the store could not answer: its outcome,
    and the store its lease settles with ("local": this process's; "allow": none)."""
    if limiter.metrics is not None:
        limiter.metrics.failed(exc)
    policy, outage = limiter.on_store_error, limiter.outage
    if policy == "allow":
        outage.decided("allowed")
        return Outcome(True, 0, round(time.time() * 1000)), None
    if policy == "local":
        outage.decided("decided locally")
        if limiter._local is None:
            limiter._local = MemoryStore()
        shares = local_share_of(charged, limiter.local_share or 1.0)
        outcome = limiter._local.acquire(lease_id, shares, max_wait_ms, ttl_ms)
        _answer(outcome, charged, limiter.metrics)
        return outcome, limiter._local
    outage.decided("deferred")
    raise StoreUnavailable(limiter.store_retry, exc) from exc


class Limiter:
    """Grants leases over a store shared by every worker (or a `MemoryStore` for one process).

    ``lease_ttl`` (seconds) is how long a concurrency slot stays held if its
    holder dies without releasing it. ``metrics`` hears of every acquire and reservation
    (see `taskthrottle.metrics`).

    ``on_store_error`` says what an acquire does while the store fails: "defer" raises
    `StoreUnavailable` (a `Throttled`) with ``store_retry`` as its retry-after; "allow"
    grants it uncounted; "local" decides in this process alone, with ``local_share`` of
    each limit. A failed store is probed again once a second, not on every call, and is
    used again as soon as it answers.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        metrics: Metrics | None = None,
        on_store_error: Policy = "defer",
        store_retry: float = 5.0,
        local_share: float | None = None,
    ) -> None:
        self.store: Store = MemoryStore() if store is None else store
        self._ttl_ms = _seconds(lease_ttl, "lease_ttl")
        self.metrics = metrics
        self.on_store_error = check_policy(on_store_error, local_share)
        self.store_retry = _seconds(store_retry, "store_retry") / 1000
        self.local_share = local_share
        self.outage = Outage()
        self._guarded = GuardedStore(self.store, self.outage, lambda: self.on_store_error)
        self._local: MemoryStore | None = None
        self.renewer = Renewer(self._guarded)

    def _renewer_for(self, store: Store) -> Renewer | None:
        """Who keeps slots held for a lease settling with ``store``: only the shared store's
        slots are renewed (an outage's local or allowed leases live out their TTL)."""
        return self.renewer if store is self._guarded else None

    def _charge(
        self,
        lease_id: str,
        charged: list[Entry],
        max_wait_ms: int,
        ttl_ms: int,
        *,
        report: bool = True,
    ) -> tuple[Outcome, Store]:
        """The store's grant and the store its lease settles with, or `Throttled`; a grant
        is reported to the metrics when ``report``."""
        outage = self.outage
        if outage.since is None or outage.may_call():
            try:
                outcome = self.store.acquire(lease_id, charged, max_wait_ms, ttl_ms)
            except StoreError as exc:
                outage.failed(exc, self.on_store_error)
                return self._without_store(exc, lease_id, charged, max_wait_ms, ttl_ms)
            if outage.since is not None:
                outage.answered()
            _answer(outcome, charged, self.metrics, report=report)
            return outcome, self._guarded
        down = StoreError(f"the store is unavailable (for {outage.down_for():.1f} s)")
        return self._without_store(down, lease_id, charged, max_wait_ms, ttl_ms)

    def _without_store(
        self, exc: StoreError, lease_id: str, charged: list[Entry], max_wait_ms: int, ttl_ms: int
    ) -> tuple[Outcome, Store]:
        """See `_offline`."""
        outcome, local = _offline(self, exc, lease_id, charged, max_wait_ms, ttl_ms)
        return outcome, NO_STORE if local is None else local

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
        outcome, store = self._charge(lease_id, charged, 0, ttl_ms)
        lease = Lease(store, lease_id, charged, outcome.now_ms / 1000)
        return lease._keep_held(self._renewer_for(store), ttl_ms)

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
        outcome, store = self._charge(lease_id, charged, max_wait_ms, ttl_ms)
        renewer = self._renewer_for(store)
        renewal = None if renewer is None else (renewer, ttl_ms)
        delay, made_at = outcome.delay_ms / 1000, outcome.now_ms / 1000
        return Reservation(store, lease_id, charged, delay, made_at, renewal, outcome.replayed)

    def redeem(
        self,
        lease_id: str,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
    ) -> Lease:
        """The lease of a turn booked by `reserve` with this ``lease_id`` (in another
        process, say), for the same request.

        The store replays its booking, charging nothing, while its turn is ahead or less
        than a minute past; a lease id it never booked (a forged or stale one) is charged
        like `acquire`, and may raise `Throttled`. A replay is not reported to ``metrics``:
        the booking was.
        """
        charged, ttl_ms, lease_id = _request(target, limits, consume, None, self._ttl_ms, lease_id)
        outcome, store = self._charge(lease_id, charged, 0, ttl_ms, report=False)
        lease = Lease(store, lease_id, charged, outcome.now_ms / 1000)
        return lease._keep_held(self._renewer_for(store), ttl_ms)

    def available(self, key: str, limits: Sequence[Limit]) -> dict[str, float]:
        """What each limit could grant now (negative when in debt); changes nothing."""
        charged = entries(key, limits, None, default=0)
        return _available(charged, self._guarded.peek(charged))

    def wait_time(
        self, target: Target, limits: Sequence[Limit] | None = None, consume: Consume | None = None
    ) -> float:
        """Seconds an acquire of this request would wait now (0.0: it would pass); read-only.

        Exact for buckets to the millisecond, and for fixed windows (quotas too) to the
        start of the window it fits in, on this machine's clock; a full sliding window
        counts until its count has surely gone by (an upper bound); a full concurrency
        limit counts as the lease TTL, the longest its holders can keep their slots.
        """
        charged = entries(target, limits, consume)
        return _wait(charged, self._guarded.peek(charged), self._ttl_ms)

    def exempt(self, names: Iterable[str] = ()) -> Lease:
        """A lease for a request exempt from its limits (a key callable of `throttled`
        returned `EXEMPT`): it charges nothing and calls no store, and is reported to
        ``metrics`` as exempt (when they have an ``exempt`` method). ``names``: the limits
        it is exempt from, which its `Lease.adjust` ignores."""
        _report_exempt(self.metrics)
        return Lease(self._guarded, new_id(), [], time.time(), exempt=frozenset(names))

    def reset(self, key: str) -> None:
        """Make every limit under ``key`` full again (and forget its slots)."""
        self._guarded.reset(check_key(key))

    def pushback(
        self,
        key: str,
        retry_after: float | None = None,
        *,
        remaining: Mapping[str, float] | None = None,
        limits: Sequence[Limit] | None = None,
    ) -> None:
        """The callee said "slow down" for ``key``: every worker holds it off.

        Every bucket and quota under ``key`` waits at least ``retry_after`` seconds from
        now, whatever request it is part of (a later hold wins); ``remaining`` maps names
        of ``limits`` to what the callee says is left, and lowers each to it (never
        raises it). While the store fails the pushback is dropped (the outage is logged).
        A hold longer than a day (a server's Retry-After may say so) is held for a day,
        and logged once, rather than refused.
        """
        key, hold_ms, lowered = _pushback(key, retry_after, remaining, limits)
        try:
            self._guarded.pushback(key, hold_ms, lowered)
        except StoreError as exc:
            log.debug("taskthrottle: pushback of %r dropped: %s", key, exc)


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

    async def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        return self.store.renew(leases, ttl_ms)

    async def reset(self, key: str) -> None:
        self.store.reset(key)

    async def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        self.store.pushback(key, hold_ms, remaining)

    async def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        return self.store.breaker(name, op, probe_round, spec)

    async def reset_breaker(self, name: str) -> None:
        self.store.reset_breaker(name)


class AsyncLimiter:
    """The asyncio twin of `Limiter`, over an `AsyncRedisStore` or a `MemoryStore`."""

    def __init__(
        self,
        store: AsyncStore | MemoryStore | None = None,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        metrics: Metrics | None = None,
        on_store_error: Policy = "defer",
        store_retry: float = 5.0,
        local_share: float | None = None,
    ) -> None:
        self._ttl_ms = _seconds(lease_ttl, "lease_ttl")
        if store is None or isinstance(store, MemoryStore):
            self.store: AsyncStore = _AsyncOverSync(store or MemoryStore())
        else:
            self.store = store
        self.metrics = metrics
        self.on_store_error = check_policy(on_store_error, local_share)
        self.store_retry = _seconds(store_retry, "store_retry") / 1000
        self.local_share = local_share
        self.outage = Outage()
        self._guarded = AsyncGuardedStore(self.store, self.outage, lambda: self.on_store_error)
        self._local: MemoryStore | None = None

    async def _charge(
        self,
        lease_id: str,
        charged: list[Entry],
        max_wait_ms: int,
        ttl_ms: int,
        *,
        report: bool = True,
    ) -> tuple[Outcome, AsyncStore]:
        """See `Limiter._charge`."""
        outage = self.outage
        if outage.since is None or outage.may_call():
            try:
                outcome = await self.store.acquire(lease_id, charged, max_wait_ms, ttl_ms)
            except StoreError as exc:
                outage.failed(exc, self.on_store_error)
                return await self._without_store(exc, lease_id, charged, max_wait_ms, ttl_ms)
            if outage.since is not None:
                outage.answered()
            _answer(outcome, charged, self.metrics, report=report)
            return outcome, self._guarded
        down = StoreError(f"the store is unavailable (for {outage.down_for():.1f} s)")
        return await self._without_store(down, lease_id, charged, max_wait_ms, ttl_ms)

    async def _without_store(
        self, exc: StoreError, lease_id: str, charged: list[Entry], max_wait_ms: int, ttl_ms: int
    ) -> tuple[Outcome, AsyncStore]:
        """See `_offline`."""
        outcome, local = _offline(self, exc, lease_id, charged, max_wait_ms, ttl_ms)
        return outcome, ASYNC_NO_STORE if local is None else _AsyncOverSync(local)

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
        outcome, store = await self._charge(lease_id, charged, 0, ttl_ms)
        return AsyncLease(store, lease_id, charged, outcome.now_ms / 1000)

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
        outcome, store = await self._charge(lease_id, charged, max_wait_ms, ttl_ms)
        delay, made_at = outcome.delay_ms / 1000, outcome.now_ms / 1000
        return AsyncReservation(store, lease_id, charged, delay, made_at, outcome.replayed)

    async def redeem(
        self,
        lease_id: str,
        target: Target,
        limits: Sequence[Limit] | None = None,
        consume: Consume | None = None,
    ) -> AsyncLease:
        """See `Limiter.redeem`."""
        charged, ttl_ms, lease_id = _request(target, limits, consume, None, self._ttl_ms, lease_id)
        outcome, store = await self._charge(lease_id, charged, 0, ttl_ms, report=False)
        return AsyncLease(store, lease_id, charged, outcome.now_ms / 1000)

    async def available(self, key: str, limits: Sequence[Limit]) -> dict[str, float]:
        """See `Limiter.available`."""
        charged = entries(key, limits, None, default=0)
        return _available(charged, await self._guarded.peek(charged))

    async def wait_time(
        self, target: Target, limits: Sequence[Limit] | None = None, consume: Consume | None = None
    ) -> float:
        """See `Limiter.wait_time`."""
        charged = entries(target, limits, consume)
        return _wait(charged, await self._guarded.peek(charged), self._ttl_ms)

    def exempt(self, names: Iterable[str] = ()) -> AsyncLease:
        """See `Limiter.exempt`."""
        _report_exempt(self.metrics)
        return AsyncLease(self._guarded, new_id(), [], time.time(), exempt=frozenset(names))

    async def reset(self, key: str) -> None:
        """See `Limiter.reset`."""
        await self._guarded.reset(check_key(key))

    async def pushback(
        self,
        key: str,
        retry_after: float | None = None,
        *,
        remaining: Mapping[str, float] | None = None,
        limits: Sequence[Limit] | None = None,
    ) -> None:
        """See `Limiter.pushback`."""
        key, hold_ms, lowered = _pushback(key, retry_after, remaining, limits)
        try:
            await self._guarded.pushback(key, hold_ms, lowered)
        except StoreError as exc:
            log.debug("taskthrottle: pushback of %r dropped: %s", key, exc)
