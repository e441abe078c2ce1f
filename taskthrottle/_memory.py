"""`MemoryStore`: the embedded store for one process.

State is striped by key, each stripe with its own lock, so threads working on
different keys do not wait for each other. A lease over several keys takes its
stripes' locks in index order, which rules out deadlock. A full bucket is the
same as no bucket, and every key carries an expiry like a Redis TTL, so idle keys
are dropped by a sweep that runs when a stripe has doubled since the last one.
"""

from __future__ import annotations

import bisect
import heapq
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from taskthrottle import _algorithms as alg
from taskthrottle import _circuit
from taskthrottle._deferrals import Deferrals, MemoryDeferrals, RedisDeferrals
from taskthrottle._entries import BUCKET, CONCURRENCY, QUOTA, Entry
from taskthrottle._store import (
    OP_MEMORY_MS,
    BreakerReply,
    BreakerSpec,
    Outcome,
    check_renew_ttl,
)

#: At most this many ids are remembered in memory; past it the half whose memory ends
#: soonest is forgotten.
MAX_REMEMBERED = 100_000

Field = tuple[int, str]  # (kind, limit name)
#: The field of a key's state that holds a pushback's end (ms), as "p" in Redis.
HELD: Field = (-1, "")
_new = tuple.__new__


def _buckets_of(entries: Sequence[Entry]) -> str | None:
    """The key, when every entry is a token bucket under that one key."""
    key = entries[0].key
    for e in entries:
        if e.kind != BUCKET or e.key != key:
            return None
    return key


class _Slots:
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


def _in_order(
    key_state: _KeyState | None, slots: _Slots, own: str | None, now: int
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


class _OpMemory:
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
                by_turn = sorted(self.done.items(), key=itemgetter(1))
                # Popped in place: ids that other stripes remember meanwhile are kept.
                for op_id, _ in by_turn[: len(by_turn) - MAX_REMEMBERED // 2]:
                    self.done.pop(op_id, None)


class _KeyState:
    __slots__ = ("expires", "fields")

    def __init__(self) -> None:
        self.fields: dict[Field, Any] = {}
        self.expires = 0


class _Stripe:
    __slots__ = ("keys", "lock", "sweep_at")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, _KeyState] = {}
        self.sweep_at = 64

    def get(self, key: str, now: int) -> _KeyState | None:
        state = self.keys.get(key)
        return None if state is None or state.expires <= now else state

    def add(self, key: str, now: int) -> _KeyState:
        """A new, empty state for ``key``; sweeps expired keys when the stripe has doubled."""
        if len(self.keys) >= self.sweep_at:
            self.sweep(now)
        state = self.keys[key] = _KeyState()
        return state

    def sweep(self, now: int) -> None:
        self.keys = {key: st for key, st in self.keys.items() if st.expires > now}
        self.sweep_at = 2 * len(self.keys) + 64


class _Locks:
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


class MemoryStore:
    """Limiter state in this process's memory: fast, exact, and gone with the process.

    ``clock`` returns seconds (``time.time`` by default); pass a manual clock in
    tests. Calendar quotas reset at UTC boundaries of that clock.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, stripes: int = 64) -> None:
        self._clock = clock
        self._stripes = [_Stripe() for _ in range(stripes)]
        # Acquires by lease id, settles by op id: apart, so that no settle id (such as
        # "<lease>:r") can pass for a lease id, nor the reverse.
        self._acquired = _OpMemory()
        self._settled = _OpMemory()
        # Breakers by name: their fields (see _circuit) and when they expire (ms).
        self._breakers: dict[str, tuple[_circuit.Fields, int]] = {}
        self._breakers_lock = threading.Lock()

    def _locked(self, entries: Sequence[Entry]) -> _Locks | threading.Lock:
        stripes = self._stripes
        first = entries[0].key
        for e in entries:
            if e.key != first:
                indices = sorted({hash(e.key) % len(stripes) for e in entries})
                return _Locks([stripes[i].lock for i in indices])
        return stripes[hash(first) % len(stripes)].lock

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        now = round(self._clock() * 1000)
        key = _buckets_of(entries)
        if key is not None:
            return self._acquire_buckets(key, lease_id, entries, max_wait_ms, now)
        with self._locked(entries):
            turn = self._acquired.seen(lease_id, now)
            if turn is not None:
                return self._replay(lease_id, entries, turn, now, ttl_ms)
            looks = [self._look(e, now, lease_id, ttl_ms) for e in entries]
            delay = 0
            for look in looks:
                delay = max(delay, look[0])
            if delay:
                violations = tuple(
                    (i, look[0])
                    for i, (look, e) in enumerate(zip(looks, entries, strict=True))
                    if look[0] > (max_wait_ms if e.kind == BUCKET else 0)
                )
                if violations:
                    return Outcome(False, delay, now, violations)
            expiry = now + delay + ttl_ms
            for entry, look in zip(entries, looks, strict=True):
                self._charge(entry, look, now, lease_id, expiry)
            self._acquired.remember(lease_id, now + delay)
        return _new(Outcome, (True, delay, now, (), False))  # Outcome(...) without its defaults

    def _replay(
        self, lease_id: str, entries: Sequence[Entry], turn: int, now: int, ttl_ms: int
    ) -> Outcome:
        """The repeat of a grant whose turn was ``turn``, as acquire.lua's `replay`: no bucket
        or quota is charged again; the lease's slots are held again from the turn, moved
        when it still holds them, taken again when freed meanwhile and they fit, else the
        repeat is refused, changing nothing."""
        delay = max(0, turn - now)
        looks = [
            (i, e, self._look(e, now, lease_id, ttl_ms))
            for i, e in enumerate(entries)
            if e.kind == CONCURRENCY
        ]
        violations = tuple((i, look[0]) for i, _, look in looks if look[0] > 0)
        if violations:
            return Outcome(False, max(wait for _, wait in violations), now, violations)
        for _, e, look in looks:
            self._charge(e, look, now, lease_id, now + delay + ttl_ms)
        return Outcome(True, delay, now, replayed=True)

    def _acquire_buckets(
        self, key: str, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, now: int
    ) -> Outcome:
        """`acquire` for token buckets under one key, the common request: the arithmetic of
        `_algorithms` inlined, since here a function call costs as much as the sums."""
        stripe = self._stripes[hash(key) % len(self._stripes)]
        with stripe.lock:
            turn = self._acquired.seen(lease_id, now)
            if turn is not None:
                return _new(Outcome, (True, max(0, turn - now), now, (), True))
            state = stripe.keys.get(key)
            live = state is not None and state.expires > now
            fields = state.fields if live else {}  # type: ignore[union-attr]
            charges = []  # (field, new debit, anchor, refill, period) per entry
            held = fields.get(HELD)
            delay = 0 if held is None else max(0, held - now)
            for _, name, _, cap, refill, period, amount in entries:
                field = (BUCKET, name)
                level = fields.get(field)
                if level is None:  # a full bucket
                    charges.append((field, amount, now, refill, period))
                    continue
                debit, anchor = level  # bucket_level, bucket_wait and bucket_add inlined
                if now > anchor:
                    whole = (now - anchor) // period
                    debit -= whole * refill
                    anchor += whole * period
                    used = debit - (now - anchor) * refill // period
                else:
                    used = debit
                if used <= 0:
                    debit, anchor = 0, now
                elif used + amount > cap:
                    wait = alg.refill_time(debit - cap + amount, refill, period)
                    delay = max(delay, wait - max(0, now - anchor))
                charges.append((field, debit + amount, anchor, refill, period))
            if delay > max_wait_ms:
                return self._refused(entries, now, max_wait_ms)
            if not live:
                state = stripe.add(key, now)
                fields = state.fields
            until = state.expires  # type: ignore[union-attr]
            for field, debit, anchor, refill, period in charges:
                fields[field] = debit, anchor
                # An upper bound of the time to full is enough to decide when to drop the key.
                until = max(until, anchor + debit * period // refill + 1)
            state.expires = until  # type: ignore[union-attr]
            self._acquired.remember(lease_id, now + delay)
        return _new(Outcome, (True, delay, now, (), False))

    def _refused(self, entries: Sequence[Entry], now: int, max_wait_ms: int) -> Outcome:
        """The refusal of a request some of whose entries wait beyond ``max_wait_ms``."""
        waits = [self._look(e, now)[0] for e in entries]
        violations = tuple(
            (i, wait)
            for i, (wait, e) in enumerate(zip(waits, entries, strict=True))
            if wait > (max_wait_ms if e.kind == BUCKET else 0)
        )
        return Outcome(False, max(waits), now, violations)

    def _look(
        self, e: Entry, now: int, lease_id: str | None = None, ttl_ms: int = 0
    ) -> tuple[int, Any, _KeyState | None]:
        """The wait for ``e``, the current state of its field, and its key's state. The
        slots ``lease_id`` holds already do not count against it: acquiring again only
        moves their expiry. A wait for slots past what a bounded read tells is ``ttl_ms``
        (see `_algorithms.slots_wait`)."""
        key, _, kind, cap, refill, period, amount = e
        key_state = self._stripes[hash(key) % len(self._stripes)].keys.get(key)
        if key_state is None or key_state.expires <= now:
            key_state = raw = None
        else:
            raw = key_state.fields.get((kind, e.name))
        held = 0 if key_state is None else key_state.fields.get(HELD, 0) - now
        if kind == BUCKET:
            level = alg.bucket_level(raw, now, refill, period)
            wait = alg.bucket_wait(level, now, cap, refill, period, amount)
            return max(wait, held), level, key_state
        if kind == QUOTA:
            used = alg.quota_used(raw, now, period)
            return max(alg.quota_wait(used, now, cap, period, amount), held), used, key_state
        slots: _Slots = raw or _Slots()
        # Refusals too forget the expired leases, under the stripe's lock: this changes
        # nothing anyone can see, and the next call need not pass them again.
        slots.prune(now)
        own = None if lease_id is None else slots.leases.get(lease_id)
        if own is None or own[0] != amount:  # as entries.lua finds its member, by weight
            used, own_id = slots.held, None
        else:
            used, own_id = slots.held - amount, lease_id
        if used + amount <= cap:
            return 0, slots, key_state
        leases = _in_order(key_state, slots, own_id, now)
        return alg.slots_wait(used, leases, now, cap, amount, ttl_ms), slots, key_state

    def _charge(
        self,
        e: Entry,
        look: tuple[int, Any, _KeyState | None],
        now: int,
        lease_id: str,
        expiry: int,
    ) -> None:
        """Add ``e.amount`` to the field that `_look` found."""
        _, state, key_state = look
        if e.kind == BUCKET:
            new = alg.bucket_add(state, now, e.amount)
            # An upper bound of the time to full is enough to decide when to drop the key.
            until = 0 if new is None else new[1] + new[0] * e.period // e.refill + 1
        elif e.kind == QUOTA:
            used = max(0, state + e.amount)
            new = (used, now // e.period) if used else None
            until = (now // e.period + 1) * e.period
        else:
            new, until = state, expiry
            state.add(lease_id, e.amount, expiry)
        if key_state is None:
            if new is None:
                return
            stripe = self._stripes[hash(e.key) % len(self._stripes)]
            key_state = stripe.keys.get(e.key)  # a sibling entry may have made it just now
            if key_state is None or key_state.expires <= now:
                key_state = stripe.add(e.key, now)
        if new is None:
            key_state.fields.pop((e.kind, e.name), None)
        else:
            key_state.fields[(e.kind, e.name)] = new
            key_state.expires = max(key_state.expires, until)

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        now = round(self._clock() * 1000)
        with self._locked([*deltas, *release]):
            if self._settled.seen(op_id, now) is not None:
                return
            for e in deltas:
                self._charge(e, self._look(e, now), now, lease_id, now)
            for e in release:
                key_state = self._stripes[hash(e.key) % len(self._stripes)].get(e.key, now)
                slots = None if key_state is None else key_state.fields.get((e.kind, e.name))
                if slots is not None:
                    slots.remove(lease_id)
            self._settled.remember(op_id, now)

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `taskthrottle.Store.renew`."""
        check_renew_ttl(ttl_ms)
        slots = [e for _, entries in leases for e in entries if e.kind == CONCURRENCY]
        if not slots:
            return [True] * len(leases)
        now = round(self._clock() * 1000)
        with self._locked(slots):
            return [
                self._renew(lease_id, entries, now + ttl_ms, now) for lease_id, entries in leases
            ]

    def _renew(self, lease_id: str, entries: Sequence[Entry], expiry: int, now: int) -> bool:
        """Moves the expiry of each slot ``lease_id`` holds of ``entries`` to ``expiry``;
        whether it held them all."""
        renewed = [
            self._renew_slot(lease_id, e, expiry, now) for e in entries if e.kind == CONCURRENCY
        ]
        return all(renewed)

    def _renew_slot(self, lease_id: str, e: Entry, expiry: int, now: int) -> bool:
        key_state = self._stripes[hash(e.key) % len(self._stripes)].get(e.key, now)
        if key_state is None:
            return False
        slots: _Slots | None = key_state.fields.get((e.kind, e.name))
        if slots is None:
            return False
        lease = slots.leases.get(lease_id)
        # Held: live, and of the same weight, as renew.lua finds its member.
        if lease is None or lease[1] <= now or lease[0] != e.amount:
            return False
        slots.add(lease_id, lease[0], expiry)
        key_state.expires = max(key_state.expires, expiry)
        return True

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        now = round(self._clock() * 1000)
        with self._locked(entries):
            return [self._available(e, now) for e in entries]

    def _available(self, e: Entry, now: int) -> int:
        _, state, _ = self._look(e, now)
        if e.kind == BUCKET:
            return e.cap - (state[2] if state else 0)
        if e.kind == QUOTA:
            return e.cap - int(state)
        return e.cap - int(state.held)

    def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        stripe = self._stripes[hash(key) % len(self._stripes)]
        with stripe.lock:
            stripe.keys.pop(key, None)

    def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `taskthrottle.Store.pushback`; as lua/pushback.lua."""
        now = round(self._clock() * 1000)
        stripe = self._stripes[hash(key) % len(self._stripes)]
        with stripe.lock:
            for e in remaining:
                look = self._look(e._replace(amount=0), now)
                used = look[1] if e.kind == QUOTA else (look[1] or (0, 0, 0))[2]
                self._charge(e._replace(amount=max(0, e.cap - e.amount - used)), look, now, "", 0)
            if hold_ms <= 0:
                return
            state = stripe.get(key, now) or stripe.add(key, now)
            if now + hold_ms > state.fields.get(HELD, 0):
                state.fields[HELD] = now + hold_ms
                state.expires = max(state.expires, now + hold_ms)

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """See `taskthrottle.Store.breaker`; `_circuit.step` under a lock."""
        now = round(self._clock() * 1000)
        with self._breakers_lock:
            fields, expires = self._breakers.get(name, ({}, 0))
            if expires <= now:
                fields = {}
            reply, dirty = _circuit.step(fields, now, op, probe_round, spec)
            if dirty:
                if fields:
                    self._breakers[name] = fields, now + _circuit.ttl(fields, now, spec)
                else:
                    self._breakers.pop(name, None)
        return reply

    def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        with self._breakers_lock:
            self._breakers.pop(name, None)

    def deferrals(self, app: str, client: Any = None, namespace: str = "taskthrottle") -> Deferrals:
        """Where the integrations park tasks of ``app``: in ``client``'s Redis (the broker's)
        under ``namespace``, else in this process, on this store's clock."""
        if client is not None:
            return RedisDeferrals(client, "{" + namespace + "}", None, app)
        return MemoryDeferrals(self._clock)
