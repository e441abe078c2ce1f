"""`MemoryStore`: the embedded store for one process.

State is striped by key, each stripe with its own lock, so threads working on
different keys do not wait for each other. A lease over several keys takes its
stripes' locks in index order, which rules out deadlock. A full bucket is the
same as no bucket, and every key carries an expiry like a Redis TTL, so idle keys
are dropped by a sweep that runs when a stripe has doubled since the last one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from taskthrottle import _algorithms as alg
from taskthrottle import _circuit
from taskthrottle import _memory_keys as keys
from taskthrottle._deferrals import Deferrals, MemoryDeferrals, RedisDeferrals
from taskthrottle._entries import BUCKET, CONCURRENCY, Entry
from taskthrottle._memory_keys import HELD, Locks, OpMemory, Slots, Stripe
from taskthrottle._memory_room import MemoryRooms
from taskthrottle._store import (
    Admission,
    BreakerReply,
    BreakerSpec,
    Outcome,
    check_renew_ttl,
)

_new = tuple.__new__


def _buckets_of(entries: Sequence[Entry]) -> str | None:
    """The key, when every entry is a token bucket under that one key."""
    key = entries[0].key
    for e in entries:
        if e.kind != BUCKET or e.key != key:
            return None
    return key


class MemoryStore:
    """Limiter state in this process's memory: fast, exact, and gone with the process.

    ``clock`` returns seconds (``time.time`` by default); pass a manual clock in
    tests. Calendar quotas reset at UTC boundaries of that clock.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, stripes: int = 64) -> None:
        self._clock = clock
        self._stripes = [Stripe() for _ in range(stripes)]
        # Acquires by lease id, settles by op id: apart, so that no settle id (such as
        # "<lease>:r") can pass for a lease id, nor the reverse.
        self._acquired = OpMemory()
        self._settled = OpMemory()
        self._breakers = _circuit.Breakers()
        self._rooms = MemoryRooms(self, lambda: round(self._clock() * 1000))

    def _locked(self, entries: Sequence[Entry]) -> Locks | threading.Lock:
        stripes = self._stripes
        first = entries[0].key
        for e in entries:
            if e.key != first:
                indices = sorted({hash(e.key) % len(stripes) for e in entries})
                return Locks([stripes[i].lock for i in indices])
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
            looks = [keys.look(self._stripes, e, now, lease_id, ttl_ms) for e in entries]
            delay = 0
            for look in looks:
                delay = max(delay, look[0])
            if delay:
                violations = tuple(
                    (i, look[0])
                    for i, (look, e) in enumerate(zip(looks, entries, strict=True))
                    if look[0] > (0 if e.kind == CONCURRENCY else max_wait_ms)
                )
                if violations:
                    return Outcome(False, delay, now, violations)
            expiry = now + delay + ttl_ms
            for entry, look in zip(entries, looks, strict=True):
                keys.charge(self._stripes, entry, look, now, lease_id, expiry)
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
            (i, e, keys.look(self._stripes, e, now, lease_id, ttl_ms))
            for i, e in enumerate(entries)
            if e.kind == CONCURRENCY
        ]
        violations = tuple((i, look[0]) for i, _, look in looks if look[0] > 0)
        if violations:
            return Outcome(False, max(wait for _, wait in violations), now, violations)
        for _, e, look in looks:
            keys.charge(self._stripes, e, look, now, lease_id, now + delay + ttl_ms)
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

    def estimate(self, entries: Sequence[Entry]) -> Outcome:
        """The refusal an acquire of ``entries`` with no wait would get now (granted when
        they fit), charging nothing."""
        now = round(self._clock() * 1000)
        with self._locked(entries):
            found = self._refused(entries, now, 0)
        return found._replace(granted=not found.violations)

    def forget_grant(self, lease_id: str) -> None:
        """Forget that ``lease_id`` was granted: acquiring it again charges it anew."""
        self._acquired.done.pop(lease_id, None)

    def join(
        self,
        room: str,
        lease_id: str,
        ref: str,
        entries: Sequence[Entry],
        ttl_ms: int,
        expires_ms: int,
    ) -> Outcome:
        """See `taskthrottle.Rooms.join`."""
        return self._rooms.join(room, lease_id, ref, entries, ttl_ms, expires_ms)

    def admit(self, room: str, most: int, ttl_ms: int, grant_ms: int) -> Admission:
        """See `taskthrottle.Rooms.admit`."""
        return self._rooms.admit(room, most, ttl_ms, grant_ms)

    def admitted(self, room: str, lease_ids: Sequence[str]) -> None:
        """See `taskthrottle.Rooms.admitted`."""
        self._rooms.admitted(room, lease_ids)

    def waiting(self, room: str, lease_ids: Sequence[str]) -> list[bool]:
        """See `taskthrottle.Rooms.waiting`."""
        return self._rooms.waiting(room, lease_ids)

    def _refused(self, entries: Sequence[Entry], now: int, max_wait_ms: int) -> Outcome:
        """The refusal of a request some of whose entries wait beyond ``max_wait_ms``."""
        waits = [keys.look(self._stripes, e, now)[0] for e in entries]
        violations = tuple(
            (i, wait)
            for i, (wait, e) in enumerate(zip(waits, entries, strict=True))
            if wait > (0 if e.kind == CONCURRENCY else max_wait_ms)
        )
        return Outcome(False, max(waits), now, violations)

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        now = round(self._clock() * 1000)
        with self._locked([*deltas, *release]):
            if self._settled.seen(op_id, now) is not None:
                return
            for e in deltas:
                keys.charge(self._stripes, e, keys.look(self._stripes, e, now), now, lease_id, now)
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
        slots: Slots | None = key_state.fields.get((e.kind, e.name))
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
        _, state, _ = keys.look(self._stripes, e, now)
        if e.kind == CONCURRENCY:
            return e.cap - int(state.held)
        return e.cap - keys.used(e, state)

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
                look = keys.look(self._stripes, e._replace(amount=0), now)
                used = keys.used(e, look[1])
                keys.charge(
                    self._stripes,
                    e._replace(amount=max(0, e.cap - e.amount - used)),
                    look,
                    now,
                    "",
                    0,
                )
            if hold_ms <= 0:
                return
            state = stripe.get(key, now) or stripe.add(key, now)
            if now + hold_ms > state.fields.get(HELD, 0):
                state.fields[HELD] = now + hold_ms
                state.expires = max(state.expires, now + hold_ms)

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """See `taskthrottle.Store.breaker`; `_circuit.step` under a lock."""
        return self._breakers.step(name, round(self._clock() * 1000), op, probe_round, spec)

    def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        self._breakers.reset(name)

    def deferrals(self, app: str, client: Any = None, namespace: str = "taskthrottle") -> Deferrals:
        """Where the integrations park tasks of ``app``: in ``client``'s Redis (the broker's)
        under ``namespace``, else in this process, on this store's clock."""
        if client is not None:
            return RedisDeferrals(client, "{" + namespace + "}", None, app)
        return MemoryDeferrals(self._clock)
