"""The parts of `MemoryStore`: per-key state in lock stripes, the leases holding a
concurrency limit, the op ids done lately, and one entry's wait and charge against its
key's state (the general path; `MemoryStore` inlines the common bucket-only one).
Mirrors what Redis keeps per key (a hash of buckets and quotas, a zset of slot holders)
and the op-id keys of the Lua scripts."""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

from taskthrottle import _algorithms as alg
from taskthrottle._entries import BUCKET, CONCURRENCY, FIXED, SLIDING, Entry
from taskthrottle._store import OP_MEMORY_MS

#: At most this many ids are remembered in memory; past it the half whose memory ends
#: soonest is forgotten.
MAX_REMEMBERED = 100_000

Field = tuple[int, str]  # (kind, limit name)
#: The field of a key's state that holds a pushback's end (ms), as "p" in Redis.
HELD: Field = (-1, "")


class Slots:
    """The leases holding one concurrency limit: ``held`` is their sum, so that a grant
    need not add them up; ``by_expiry`` keeps them sorted by expiry, as Redis' zset does, so
    that the expired are a prefix and a wait reads the soonest without a scan."""

    __slots__ = ("by_expiry", "held", "leases")

    def __init__(self) -> None:
        self.leases: dict[str, tuple[int, int]] = {}  # lease id -> (slots_mt, expiry_ms)
        self.held = 0
        # (expiry_ms, lease id) of every lease, sorted. A list rather than a heap: a heap keeps
        # the entries of moved (renewed) leases, which a wait would have to read past.
        self.by_expiry: list[tuple[int, str]] = []

    def prune(self, now: int) -> None:
        expired = bisect.bisect_left(self.by_expiry, (now + 1,))
        if expired:
            for _, lease_id in self.by_expiry[:expired]:
                self.held -= self.leases.pop(lease_id)[0]
            del self.by_expiry[:expired]

    def add(self, lease_id: str, weight: int, expiry: int) -> None:
        self.remove(lease_id)
        self.leases[lease_id] = (weight, expiry)
        self.held += weight
        bisect.insort(self.by_expiry, (expiry, lease_id))

    def by_age(self, own: str | None = None) -> Iterator[tuple[int, int]]:
        """The leases' ``(slots_mt, expiry_ms)``, soonest expiry first, on demand; ``own``'s
        as 0 slots (it frees nothing for itself), but read all the same, as entries.lua
        reads its member."""
        leases = self.leases
        for expiry, lease_id in self.by_expiry:
            yield (0 if lease_id == own else leases[lease_id][0]), expiry

    def remove(self, lease_id: str) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self.held -= lease[0]
            del self.by_expiry[bisect.bisect_left(self.by_expiry, (lease[1], lease_id))]


def in_order(
    key_state: KeyState | None, slots: Slots, own: str | None, now: int
) -> Iterator[tuple[int, int]]:
    """``slots.by_age(own)``, merged with the leases of the key's other concurrency limits as
    0 slots: Redis keeps the leases of every limit of a key in one zset, and entries.lua
    reads them in one order, which a bounded read must follow to give the same answer."""
    others = []
    for (kind, _), field in ({} if key_state is None else key_state.fields).items():
        if kind == CONCURRENCY and field is not slots:
            field.prune(now)  # as entries.lua prunes every limit of the key
            others.append(((0, expiry) for expiry, _ in field.by_expiry))
    if not others:
        return slots.by_age(own)
    return heapq.merge(slots.by_age(own), *others, key=itemgetter(1))


class OpMemory:
    """Op ids done lately, each with its turn (ms), so that a repeat before its turn +
    `OP_MEMORY_MS` changes nothing; past `MAX_REMEMBERED` ids the half whose turns came
    first is forgotten."""

    __slots__ = ("done", "lock")

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()

    def seen(self, op_id: str, now: int) -> int | None:
        """When ``op_id``'s turn comes or came (ms), unless that was `OP_MEMORY_MS` ago."""
        seen = self.done.get(op_id)
        return seen if seen is not None and now < seen + OP_MEMORY_MS else None

    def remember(self, op_id: str, turn: int) -> None:
        self.done[op_id] = turn  # one dict store: atomic under the GIL
        if len(self.done) > MAX_REMEMBERED:
            self.forget_soonest_half()

    def forget_soonest_half(self) -> None:
        # A bounded memory beats remembering every id for its full span. The ids forgotten
        # are those whose memory ends soonest, the earliest turns, never a reservation's
        # booked ahead before ids granted now: the integrations check a deferred copy's
        # turn by acquiring again with its lease id, and a forgotten id would be charged.
        with self.lock:
            if len(self.done) > MAX_REMEMBERED:
                by_turn = sorted(
                    self.done.copy().items(), key=itemgetter(1)
                )  # a copy: no lock stops writers
                # Popped in place: ids that other stripes remember meanwhile are kept.
                for op_id, _ in by_turn[: len(by_turn) - MAX_REMEMBERED // 2]:
                    self.done.pop(op_id, None)


class KeyState:
    __slots__ = ("expires", "fields")

    def __init__(self) -> None:
        self.fields: dict[Field, Any] = {}
        self.expires = 0


class Stripe:
    __slots__ = ("keys", "lock", "sweep_at")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, KeyState] = {}
        self.sweep_at = 64

    def get(self, key: str, now: int) -> KeyState | None:
        state = self.keys.get(key)
        return None if state is None or state.expires <= now else state

    def add(self, key: str, now: int) -> KeyState:
        """A new, empty state for ``key``; sweeps expired keys when the stripe has doubled."""
        if len(self.keys) >= self.sweep_at:
            self.sweep(now)
        state = self.keys[key] = KeyState()
        return state

    def sweep(self, now: int) -> None:
        self.keys = {key: st for key, st in self.keys.items() if st.expires > now}
        self.sweep_at = 2 * len(self.keys) + 64


class Locks:
    """Holds several stripe locks, taken in stripe order so that no two callers deadlock."""

    __slots__ = ("locks",)

    def __init__(self, locks: list[threading.Lock]) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self.locks):
            lock.release()


def look(
    stripes: list[Stripe], e: Entry, now: int, lease_id: str | None = None, ttl_ms: int = 0
) -> tuple[int, Any, KeyState | None]:
    """The wait for ``e``, the current state of its field, and its key's state. The
    slots ``lease_id`` holds already do not count against it: acquiring again only
    moves their expiry. A wait for slots past what a bounded read tells is ``ttl_ms``
    (see `_algorithms.slots_wait`)."""
    key, _, kind, cap, refill, period, amount = e
    key_state = stripes[hash(key) % len(stripes)].keys.get(key)
    if key_state is None or key_state.expires <= now:
        key_state = raw = None
    else:
        raw = key_state.fields.get((kind, e.name))
    held = 0 if key_state is None else key_state.fields.get(HELD, 0) - now
    if kind == BUCKET:
        level = alg.bucket_level(raw, now, refill, period)
        wait = alg.bucket_wait(level, now, cap, refill, period, amount)
        return max(wait, held), level, key_state
    if kind == FIXED:
        window = alg.window_level(raw, now, cap, period)
        return max(alg.window_wait(window, now, cap, period, amount), held), window, key_state
    if kind == SLIDING:
        sliding = alg.sliding_level(raw, now, cap, period)
        wait = alg.sliding_wait(sliding, now, cap, period, amount)
        return max(wait, held), sliding, key_state
    slots: Slots = raw or Slots()
    wait = _slots_wait(key_state, slots, e, now, lease_id, ttl_ms)
    # An acquire is held off by a pushback on every entry's key, slots included.
    return max(wait, held if lease_id is not None else 0), slots, key_state


def _slots_wait(
    key_state: KeyState | None, slots: Slots, e: Entry, now: int, lease_id: str | None, ttl_ms: int
) -> int:
    """The wait for ``e``'s slots (see `look`)."""
    cap, amount = e.cap, e.amount
    # Refusals too forget the expired leases, under the stripe's lock: this changes
    # nothing anyone can see, and the next call need not pass them again.
    slots.prune(now)
    own = None if lease_id is None else slots.leases.get(lease_id)
    if own is None or own[0] != amount:  # as entries.lua finds its member, by weight
        used, own_id = slots.held, None
    else:
        used, own_id = slots.held - amount, lease_id
    if used + amount <= cap:
        return 0
    leases = in_order(key_state, slots, own_id, now)
    return alg.slots_wait(used, leases, now, cap, amount, ttl_ms)


def used(e: Entry, level: Any) -> int:
    """What the bucket or window that `look` found holds now, in millitokens."""
    if e.kind == FIXED:
        return int(level[0])
    return 0 if level is None else int(level[-1])  # a bucket's or a sliding window's


def charge(
    stripes: list[Stripe],
    e: Entry,
    look: tuple[int, Any, KeyState | None],
    now: int,
    lease_id: str,
    expiry: int,
) -> None:
    """Add ``e.amount`` to the field that `look` found."""
    _, state, key_state = look
    new: Any
    if e.kind == BUCKET:
        new = alg.bucket_add(state, now, e.amount)
        # An upper bound of the time to full is enough to decide when to drop the key.
        until = 0 if new is None else new[1] + new[0] * e.period // e.refill + 1
    elif e.kind == FIXED:
        new = alg.window_add(state, e.amount)
        until = 0 if new is None else alg.window_until(new, e.cap, e.period)
    elif e.kind == SLIDING:
        new = alg.sliding_add(state, e.amount)
        until = 0 if new is None else alg.sliding_until(new, e.cap, e.period)
    else:
        new, until = state, expiry
        state.add(lease_id, e.amount, expiry)
    if key_state is None:
        if new is None:
            return
        stripe = stripes[hash(e.key) % len(stripes)]
        key_state = stripe.keys.get(e.key)  # a sibling entry may have made it just now
        if key_state is None or key_state.expires <= now:
            key_state = stripe.add(e.key, now)
    if new is None:
        key_state.fields.pop((e.kind, e.name), None)
    else:
        key_state.fields[(e.kind, e.name)] = new
        key_state.expires = max(key_state.expires, until)
