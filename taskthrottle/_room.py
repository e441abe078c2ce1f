"""The waiting room's order: which waiting request is admitted first when budget frees.
`MemoryStore` runs this model; lua/room.lua mirrors it.

Tickets wait in start-time fair order. Each flow (the keys a request spans: a tenant's
requests share one) gets its next ticket one step after its last, and never before the
room's virtual time, the start of the ticket admitted last: flows take turns, and each
flow is first in, first out. A ticket that does not fit blocks every resource (a bucket,
a window, a limit's slots) it needs: no ticket behind it takes from those, so that
neither a large request nor a small one starves, and a request arriving while tickets
wait for any of its resources waits behind them.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from taskthrottle._entries import CONCURRENCY, Entry

#: How many waiting tickets one admission looks at, at most: an admission is one atomic
#: step in the store, which must stay short while other clients wait.
SCAN = 64
#: Milliseconds between offers of a granted ticket whose task was not taken yet (its
#: parking landed after the grant, or the releaser it was offered to died).
REOFFER_MS = 1_000
#: Flows remembered before those that fell behind the virtual time are forgotten.
MAX_FLOWS = 10_000

#: A resource a ticket needs: (key, 1 for slots or 0 for a bucket or window, limit name).
Resource = tuple[str, int, str]


class Ticket(NamedTuple):
    """A request waiting in a room: its lease id, what the integration finds the task by
    (``ref``), its flow, its place (``start``), when it expires (ms) and its entries."""

    lease_id: str
    ref: str
    flow: str
    start: int
    expires: int
    entries: tuple[Entry, ...]


def resources(entries: Iterable[Entry]) -> set[Resource]:
    """The resources ``entries`` take from."""
    return {(e.key, int(e.kind == CONCURRENCY), e.name) for e in entries}


def flow_of(entries: Iterable[Entry]) -> str:
    """The flow of a request: the keys it spans, in order."""
    return "|".join(sorted({e.key for e in entries}))


class RoomOrder:
    """The tickets of one room, in admission order, and what they block."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, str]] = []  # (start, lease id), sorted
        self.tickets: dict[str, Ticket] = {}
        self.flows: dict[str, int] = {}  # flow -> start of its next ticket
        self.virtual = 0
        self.using: Counter[Resource] = Counter()  # waiting tickets per resource

    def blocked(self, entries: Sequence[Entry]) -> bool:
        """Whether a waiting ticket needs any resource of ``entries``."""
        return any(self.using[r] for r in resources(entries))

    def place(
        self, lease_id: str, ref: str, flow: str, expires: int, entries: Sequence[Entry]
    ) -> Ticket:
        """Queue a new ticket at its flow's next start."""
        start = max(self.virtual, self.flows.get(flow, 0))
        self.flows[flow] = start + 1
        if len(self.flows) > MAX_FLOWS:
            self.flows = {f: s for f, s in self.flows.items() if s > self.virtual}
        ticket = Ticket(lease_id, ref, flow, start, expires, tuple(entries))
        bisect.insort(self.queue, (start, lease_id))
        self.tickets[lease_id] = ticket
        self.using.update(resources(entries))
        return ticket

    def remove(self, ticket: Ticket) -> None:
        """Take ``ticket`` out of the queue (admitted, or expired)."""
        self.queue.remove((ticket.start, ticket.lease_id))
        del self.tickets[ticket.lease_id]
        self.using.subtract(resources(ticket.entries))
        self.using = +self.using  # drops the resources no ticket needs any more

    def admit(self, now: int, grant: Callable[[Ticket], bool], most: int) -> list[Ticket]:
        """Grant, in order, the tickets among the first `SCAN` that ``grant`` takes (it
        charges them, or says False); at most ``most``. A ticket refused, or behind one
        refused on any of its resources, waits; an expired ticket is dropped."""
        blocked: set[Resource] = set()
        admitted: list[Ticket] = []
        for _, lease_id in self.queue[:SCAN]:
            ticket = self.tickets[lease_id]
            if ticket.expires <= now:
                self.remove(ticket)
                continue
            needs = resources(ticket.entries)
            if blocked & needs or len(admitted) >= most or not grant(ticket):
                blocked |= needs
                continue
            self.remove(ticket)
            self.virtual = max(self.virtual, ticket.start)
            admitted.append(ticket)
        return admitted
