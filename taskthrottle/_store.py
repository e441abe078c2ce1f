"""The store protocol: where limiter state lives, in integer millitokens and milliseconds.

A store knows buckets, slots and quotas by key and limit name; it knows nothing of
leases beyond their ids, nothing of Celery or Dramatiq. Each method is one atomic
operation (one Lua call in Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from taskthrottle._entries import Entry
from taskthrottle._exceptions import InvalidInput
from taskthrottle._limits import MAX_EXACT

#: How long (ms) every store remembers a granted lease id or a settle id after its turn,
#: making a repeat a no-op (the Lua scripts get it from `_redis.Script`).
OP_MEMORY_MS = 60_000

#: Breaker operations (see `Store.breaker`): ask to pass, report an outcome, or read.
ENTER, SUCCESS, FAILURE, IGNORE, PEEK = 0, 1, 2, 3, 4
#: Breaker states, as stores keep them.
CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class Outcome(NamedTuple):
    """A store's answer to an acquire.

    Granted: ``delay_ms`` is when the turn comes (0 = now). Refused:
    ``delay_ms`` is the wait after which the whole request would pass, and
    ``violations`` pairs the index of each refusing entry with its own wait.
    ``now_ms`` is the store's clock at the decision. ``replayed``: the grant is the
    repeat of an earlier grant of the same lease id, which charged it.
    """

    granted: bool
    delay_ms: int
    now_ms: int
    violations: tuple[tuple[int, int], ...] = ()
    replayed: bool = False


class BreakerSpec(NamedTuple):
    """A breaker's rules, in integers: open at ``threshold`` failures (0: no such rule) or
    at a failure rate of ``rate`` thousandths (0: none) over at least ``minimum_calls``
    calls, within the last ``window`` ms; stay open ``recovery`` ms; then let
    ``probes`` calls through at once, closing after ``successes`` of them succeed; a probe
    not reported within ``probe_timeout`` ms of the latest one counts as lost."""

    threshold: int
    rate: int
    minimum_calls: int
    window: int
    recovery: int
    probes: int
    successes: int
    probe_timeout: int


class BreakerReply(NamedTuple):
    """A store's answer to a breaker operation.

    ``verdict``: 0 refused (wait ``wait_ms``), 1 passed while closed, 2 passed as the probe
    whose id is ``round`` (to report with it). ``state`` after the operation; ``calls`` and
    ``failures`` in the window (closed), or ``probes`` in flight and ``successes`` so far
    (half-open). ``changed`` is the state this operation moved the breaker to, or -1:
    exactly one caller sees each transition.
    """

    verdict: int
    wait_ms: int
    state: int
    calls: int
    failures: int
    probes: int
    successes: int
    round: int
    changed: int
    now_ms: int


def check_renew_ttl(ttl_ms: object) -> int:
    """Return ``ttl_ms`` if it is a renewal's ttl: whole milliseconds, above zero (and
    below 2**53, as Lua numbers are exact)."""
    if type(ttl_ms) is not int or not 0 < ttl_ms < MAX_EXACT:
        msg = f"a renewal's ttl_ms must be whole milliseconds above zero, got {ttl_ms!r}"
        raise InvalidInput(msg)
    return ttl_ms


class Store(Protocol):
    """Where limiter state lives. Every method is atomic and idempotent by its id."""

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """Charge every entry, or none; see `Outcome`.

        A bucket entry may be charged into debt when its turn lies within
        ``max_wait_ms``; concurrency and quota entries pass only when they fit
        now. Concurrency slots are held for ``ttl_ms`` after the turn; the slots
        ``lease_id`` holds already never count against it, and only move their expiry.
        Repeating a granted ``lease_id`` (until a minute past its turn) returns the first answer and
        charges no bucket or quota again; its slots are held again from the turn, taken
        again if they were freed meanwhile and fit, else the repeat is refused.
        """
        ...

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """Add each delta's ``amount`` (negative refunds) and free ``lease_id``'s slots
        in ``release``. Repeating an ``op_id`` changes nothing."""
        ...

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """The millitokens (or slots) each entry could take now; negative when in debt."""
        ...

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """Hold the slots of each ``(lease id, entries)`` until ``ttl_ms`` from now, in one
        operation; per lease, whether all its slots were still held (a slot gone, released
        or expired, is not taken again). Entries other than concurrency are ignored."""
        ...

    def reset(self, key: str) -> None:
        """Forget every limit under ``key``: they are full again."""
        ...

    def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """Hold off ``key``: every bucket and quota under it waits at least ``hold_ms``
        from now (a later hold wins), and each of ``remaining`` (buckets and quotas of
        ``key``, ``amount`` being what is left) is lowered to its amount, never raised."""
        ...

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """One step of breaker ``name`` (see `_circuit.step`), atomically: ``op`` is
        ENTER, SUCCESS, FAILURE, IGNORE (of a call passed in ``probe_round``: 0 when
        closed, else the probe's id) or PEEK (writes nothing). A breaker without state is
        closed."""
        ...

    def reset_breaker(self, name: str) -> None:
        """Forget breaker ``name``'s state: it is closed, its window empty."""
        ...


class AsyncStore(Protocol):
    """The asyncio twin of `Store`."""

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `Store.acquire`."""
        ...

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `Store.settle`."""
        ...

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `Store.peek`."""
        ...

    async def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `Store.renew`."""
        ...

    async def reset(self, key: str) -> None:
        """See `Store.reset`."""
        ...

    async def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `Store.pushback`."""
        ...

    async def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        """See `Store.breaker`."""
        ...

    async def reset_breaker(self, name: str) -> None:
        """See `Store.reset_breaker`."""
        ...


class Admission(NamedTuple):
    """What one admission of a waiting room did: the tickets granted (new ones, and those
    granted earlier whose tasks were not taken yet), as (lease id, ref) pairs; how many
    still wait; and whether the room has state (False before anything waited in it, and
    once its state vanished: a caller that knew tickets waited learns that they were lost
    with a restart, a flush or an eviction)."""

    granted: list[tuple[str, str]]
    waiting: int
    intact: bool = True


@runtime_checkable
class Rooms(Protocol):
    """A store with waiting rooms (`MemoryStore`, `RedisStore`): requests that cannot pass
    now wait in the store, which grants them in fair order as soon as budget frees."""

    def join(
        self,
        room: str,
        lease_id: str,
        ref: str,
        entries: Sequence[Entry],
        ttl_ms: int,
        expires_ms: int,
    ) -> Outcome:
        """Grant the request now, as `Store.acquire` with no wait, when it fits and no
        ticket of ``room`` waits for any of its resources; else queue a ticket for it (kept
        ``expires_ms`` at most; ``ref`` is what the caller finds its task by) and answer
        refused, with the wait its own limits alone would give. A lease id waiting
        already is not queued twice."""
        ...

    def admit(self, room: str, most: int, ttl_ms: int, grant_ms: int) -> Admission:
        """Give back the grants not taken up within ``grant_ms`` (refunded, their slots
        freed, their lease ids forgotten), then grant in order the waiting tickets that
        fit, at most ``most``, each as its acquire would (slots held ``ttl_ms``)."""
        ...

    def admitted(self, room: str, lease_ids: Sequence[str]) -> None:
        """The granted tickets whose tasks took their leases up: they are kept."""
        ...

    def waiting(self, room: str, lease_ids: Sequence[str]) -> list[bool]:
        """Whether each lease id still waits in ``room``."""
        ...
