"""`Lease` and `Reservation`: what an acquire hands back, and how it is settled.

The sync and async twins share everything but the store calls, which live in the
small subclasses at the end of each pair.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from taskthrottle._entries import CONCURRENCY, Entry, milli_amount
from taskthrottle._exceptions import InvalidInput
from taskthrottle._limits import MAX_EXACT
from taskthrottle._store import AsyncStore, Store

if TYPE_CHECKING:
    from taskthrottle._renewal import Renewer


class _LeaseBase:
    """The entries a lease charged, with its net charge on each."""

    __slots__ = (
        "__weakref__",
        "_entries",
        "_pending",
        "_steps",
        "exempt",
        "granted_at",
        "id",
        "released",
    )

    def __init__(
        self,
        lease_id: str,
        entries: list[Entry],
        granted_at: float,
        exempt: frozenset[str] = frozenset(),
    ) -> None:
        #: The lease id; the store knows the lease's slots by it.
        self.id = lease_id
        #: When the store granted the lease, on the store's clock (seconds).
        self.granted_at = granted_at
        self.released = False
        #: The limits this lease is exempt from (see `Limiter.exempt`): `adjust` ignores them.
        self.exempt = exempt
        self._entries = entries
        self._steps = 0
        #: The deltas of an adjust whose store call failed: a retry must send the same op.
        self._pending: list[Entry] | None = None

    @property
    def consumed(self) -> dict[str, float]:
        """Tokens charged per limit name, adjustments included."""
        return {e.name: e.amount / 1000 for e in self._entries if e.kind != CONCURRENCY}

    def _deltas(self, changes: Mapping[str, float]) -> tuple[str, list[Entry]]:
        """The settle id and the entries (amount = delta) that ``changes`` asks for."""
        out = []
        for name, value in changes.items():
            delta = milli_amount(value, "adjust({}=...)", name, signed=True)
            matched = [e for e in self._entries if e.name == name]
            if not matched and name in self.exempt:
                continue
            if not matched:
                known = sorted({e.name for e in self._entries})
                msg = f"adjust names limit {name!r}, which this lease does not hold (holds {known})"
                raise InvalidInput(msg)
            for e in matched:
                if e.kind == CONCURRENCY:
                    msg = f"cannot adjust concurrency limit {name!r}; release the lease instead"
                    raise InvalidInput(msg)
                if e.amount + delta < 0:
                    msg = (
                        f"adjust({name}={value!r}) would refund more than this lease "
                        f"consumed ({e.amount / 1000:g})"
                    )
                    raise InvalidInput(msg)
                if e.cap + e.refill * e.period + abs(delta) >= MAX_EXACT:  # as Lua checks
                    raise InvalidInput(f"adjust({name}={value!r}) is too large")
                out.append(e._replace(amount=delta))
        if not out:
            return "", out
        if self._pending is not None and out != self._pending:
            msg = (
                f"an adjust of lease {self.id} failed and may have been applied: retry it with "
                f"the same amounts ({self._describe(self._pending)}), not {self._describe(out)}"
            )
            raise InvalidInput(msg)
        self._pending = out
        return f"{self.id}:a{self._steps + 1}", out

    @staticmethod
    def _describe(deltas: list[Entry]) -> str:
        return ", ".join(f"{d.key}/{d.name}={d.amount / 1000:+g}" for d in deltas)

    def _apply(self, deltas: list[Entry]) -> None:
        """Record an adjust the store applied: the next one is a new op."""
        self._steps += 1
        self._pending = None
        by_field = {(d.key, d.name): d.amount for d in deltas}
        self._entries = [
            e._replace(amount=e.amount + by_field.get((e.key, e.name), 0)) for e in self._entries
        ]

    def _slots(self) -> list[Entry]:
        return [e for e in self._entries if e.kind == CONCURRENCY]

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"<{kind} {self.id} consumed={self.consumed} released={self.released}>"


def _release_id(lease_id: str) -> str:
    """A release's op id, new for every release: freeing a slot is idempotent by itself (a
    member removed twice counts once), while a remembered id would ignore the release of a
    slot that a redelivery of the same lease took again within the op memory."""
    return f"{lease_id}:r{os.urandom(6).hex()}"


class Lease(_LeaseBase):
    """Permission granted by `Limiter.acquire`: the limits are charged.

    `adjust` corrects consumption after the fact; `release` frees concurrency
    slots (tokens stay spent). Use it as a context manager to release on exit.
    A `Limiter`'s leases keep their slots held while they are not released.
    """

    __slots__ = ("_renewal", "_store")

    def __init__(
        self,
        store: Store,
        lease_id: str,
        entries: list[Entry],
        granted_at: float = 0.0,
        exempt: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(lease_id, entries, granted_at, exempt)
        self._store = store
        self._renewal: tuple[Renewer, int] | None = None

    def _keep_held(self, renewer: Renewer | None, ttl_ms: int) -> Lease:
        """Have ``renewer`` keep this lease's slots held until it is released."""
        slots = self._slots()
        if renewer is not None and slots and not self.released:
            self._renewal = renewer, ttl_ms
            renewer.hold(self.id, slots, ttl_ms)
            # A lease dropped without release stops being renewed: its slots then expire.
            weakref.finalize(self, renewer.drop, self.id)
        return self

    def adjust(self, **changes: float) -> None:
        """Charge more (positive, may go into debt) or refund (negative) per limit name."""
        op_id, deltas = self._deltas(changes)
        if deltas:
            self._store.settle(op_id, self.id, deltas, [])
            self._apply(deltas)

    def release(self) -> None:
        """End the lease: give back its concurrency slots. Idempotent."""
        if not self.released:
            if self._renewal is not None:  # even if the release fails: the slots then expire
                self._renewal[0].drop(self.id)
            slots = self._slots()
            if slots:
                self._store.settle(_release_id(self.id), self.id, [], slots)
            self.released = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AsyncLease(_LeaseBase):
    """The asyncio twin of `Lease`."""

    __slots__ = ("_store",)

    def __init__(
        self,
        store: AsyncStore,
        lease_id: str,
        entries: list[Entry],
        granted_at: float = 0.0,
        exempt: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(lease_id, entries, granted_at, exempt)
        self._store = store

    async def adjust(self, **changes: float) -> None:
        """Charge more (positive, may go into debt) or refund (negative) per limit name."""
        op_id, deltas = self._deltas(changes)
        if deltas:
            await self._store.settle(op_id, self.id, deltas, [])
            self._apply(deltas)

    async def release(self) -> None:
        """End the lease: give back its concurrency slots. Idempotent."""
        if not self.released:
            slots = self._slots()
            if slots:
                await self._store.settle(_release_id(self.id), self.id, [], slots)
            self.released = True

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


L = TypeVar("L", Lease, AsyncLease)


class _ReservationBase(Generic[L]):
    """A booked turn and the lease it holds; `cancel` lives in the twins."""

    def __init__(self, lease: L, delay: float, replayed: bool = False) -> None:
        self._lease: L = lease
        #: Seconds from the moment the reservation was made until its turn.
        self.delay = delay
        #: True when the store had booked this lease id already (a repeated call): this
        #: reservation is that booking, charged then.
        self.replayed = replayed
        #: "reserved", "redeemed" or "cancelled".
        self.state = "reserved"

    @property
    def id(self) -> str:
        """The reservation's id, which its lease keeps."""
        return self._lease.id

    def redeem(self) -> L:
        """The lease this reservation booked; charges nothing more."""
        if self.state == "cancelled":
            raise InvalidInput(f"reservation {self.id} was cancelled")
        self.state = "redeemed"
        return self._lease

    def _refund(self) -> tuple[str, list[Entry], list[Entry]] | None:
        """What a cancel settles, or None when it is cancelled already."""
        if self.state == "redeemed":
            msg = f"reservation {self.id} was redeemed: release its lease instead"
            raise InvalidInput(msg)
        if self.state == "cancelled":
            return None
        lease = self._lease
        refunds = [e._replace(amount=-e.amount) for e in lease._entries if e.kind != CONCURRENCY]
        return f"{self.id}:c", refunds, lease._slots()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} delay={self.delay:.3f}s {self.state}>"


class Reservation(_ReservationBase[Lease]):
    """A turn booked by `Limiter.reserve`: the tokens are charged now.

    ``delay`` is the number of seconds, from the moment it was made, until the
    turn comes. `redeem` then yields the `Lease` without charging again;
    `cancel` gives the tokens and slots back. A reservation never redeemed keeps
    its tokens spent, so a lost caller can only under-use a limit.
    """

    def __init__(
        self,
        store: Store,
        lease_id: str,
        entries: list[Entry],
        delay: float,
        made_at: float = 0.0,
        renewal: tuple[Renewer, int] | None = None,
        replayed: bool = False,
    ) -> None:
        super().__init__(Lease(store, lease_id, entries, made_at), delay, replayed)
        self._renewal = renewal

    def redeem(self) -> Lease:
        """The lease this reservation booked; charges nothing more. Its slots are kept held
        from now until it is released."""
        lease = super().redeem()
        if self._renewal is not None:
            lease._keep_held(*self._renewal)
        return lease

    def cancel(self) -> None:
        """Give the tokens and slots back. Idempotent; not possible once redeemed."""
        refund = self._refund()
        if refund is not None:
            self._lease._store.settle(refund[0], self.id, refund[1], refund[2])
            self.state = "cancelled"


class AsyncReservation(_ReservationBase[AsyncLease]):
    """The asyncio twin of `Reservation`."""

    def __init__(
        self,
        store: AsyncStore,
        lease_id: str,
        entries: list[Entry],
        delay: float,
        made_at: float = 0.0,
        replayed: bool = False,
    ) -> None:
        super().__init__(AsyncLease(store, lease_id, entries, made_at), delay, replayed)

    async def cancel(self) -> None:
        """Give the tokens and slots back. Idempotent; not possible once redeemed."""
        refund = self._refund()
        if refund is not None:
            await self._lease._store.settle(refund[0], self.id, refund[1], refund[2])
            self.state = "cancelled"
