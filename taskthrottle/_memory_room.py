"""Waiting rooms of a `MemoryStore`: the model of `_room` run under one lock, granting
through the store's own acquire (see `taskthrottle._store.Rooms`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from taskthrottle._entries import CONCURRENCY, Entry
from taskthrottle._room import REOFFER_MS, RoomOrder, Ticket, flow_of
from taskthrottle._store import Admission, Outcome


class Granting(Protocol):
    """What the rooms need of their store."""

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome: ...

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None: ...

    def estimate(self, entries: Sequence[Entry]) -> Outcome: ...

    def forget_grant(self, lease_id: str) -> None: ...


class Granted:
    """A ticket granted and not yet taken up: until when it holds, and its next offer."""

    __slots__ = ("deadline", "offer", "ticket")

    def __init__(self, ticket: Ticket, deadline: int, offer: int) -> None:
        self.ticket, self.deadline, self.offer = ticket, deadline, offer


class MemoryRooms:
    """Every waiting room of one `MemoryStore`."""

    def __init__(self, store: Granting, now: Callable[[], int]) -> None:
        self.store = store
        self.now = now
        self.lock = threading.Lock()
        self.orders: dict[str, RoomOrder] = {}
        self.granted: dict[str, dict[str, Granted]] = {}

    def join(
        self,
        room: str,
        lease_id: str,
        ref: str,
        entries: Sequence[Entry],
        ttl_ms: int,
        expires_ms: int,
    ) -> Outcome:
        """See `taskthrottle._store.Rooms.join`."""
        with self.lock:
            order = self.orders.get(room) or RoomOrder()
            if lease_id not in order.tickets and not order.blocked(entries):
                outcome = self.store.acquire(lease_id, entries, 0, ttl_ms)
                if outcome.granted:
                    return outcome
            else:  # it waits behind others, or waits already: its own wait, for the record
                outcome = self.store.estimate(entries)
            if lease_id not in order.tickets:
                self.orders[room] = order  # the room exists once anything waited in it
                order.place(lease_id, ref, flow_of(entries), outcome.now_ms + expires_ms, entries)
            return Outcome(False, outcome.delay_ms, outcome.now_ms, outcome.violations)

    def admit(self, room: str, most: int, ttl_ms: int, grant_ms: int) -> Admission:
        """See `taskthrottle._store.Rooms.admit`."""
        now = self.now()
        with self.lock:
            order = self.orders.get(room)
            granted = self.granted.setdefault(room, {})
            for lease_id, held in list(granted.items()):
                if held.deadline <= now:
                    del granted[lease_id]
                    self.store.settle(*_giving_back(lease_id, held.ticket.entries))
                    self.store.forget_grant(lease_id)
            if order is None:
                return Admission([], 0, intact=False)
            offered = [
                (lease_id, held.ticket.ref)
                for lease_id, held in granted.items()
                if held.offer <= now
            ][:most]
            for lease_id, _ in offered:
                granted[lease_id].offer = now + REOFFER_MS

            def grant(ticket: Ticket) -> bool:
                return self.store.acquire(ticket.lease_id, ticket.entries, 0, ttl_ms).granted

            for ticket in order.admit(now, grant, most - len(offered)):
                granted[ticket.lease_id] = Granted(ticket, now + grant_ms, now + REOFFER_MS)
                offered.append((ticket.lease_id, ticket.ref))
            return Admission(offered, len(order.queue))

    def admitted(self, room: str, lease_ids: Sequence[str]) -> None:
        """See `taskthrottle._store.Rooms.admitted`."""
        with self.lock:
            granted = self.granted.get(room, {})
            for lease_id in lease_ids:
                granted.pop(lease_id, None)

    def waiting(self, room: str, lease_ids: Sequence[str]) -> list[bool]:
        """See `taskthrottle._store.Rooms.waiting`."""
        with self.lock:
            tickets = self.orders.get(room, RoomOrder()).tickets
            return [lease_id in tickets for lease_id in lease_ids]


def _giving_back(
    lease_id: str, entries: Sequence[Entry]
) -> tuple[str, str, list[Entry], list[Entry]]:
    """The settle that gives a grant back: its charges refunded, its slots freed."""
    deltas = [e._replace(amount=-e.amount) for e in entries if e.kind != CONCURRENCY and e.amount]
    slots = [e for e in entries if e.kind == CONCURRENCY]
    return f"{lease_id}:back", lease_id, deltas, slots
