"""The arithmetic of buckets, quotas and slots: pure functions of state and time.

`MemoryStore` runs these; the Lua scripts in ``lua/`` mirror them line for line,
and the contract tests hold the two to identical answers.

A token bucket is kept as ``(debit, anchor)``: ``debit`` millitokens were taken
since the bucket was last full, counted from ``anchor`` (ms). What has refilled
since is ``elapsed * refill // period``, computed from the anchor every time, so
rounding never accumulates. Whole periods are folded into the anchor to keep the
product below 2**53. A full bucket has no state at all.
"""

from __future__ import annotations

from collections.abc import Iterable

BucketState = tuple[int, int]  # (debit_mt, anchor_ms)
QuotaState = tuple[int, int]  # (used_mt, window_index)


def bucket_level(
    state: BucketState | None, now: int, refill: int, period: int
) -> tuple[int, int, int] | None:
    """Return ``(debit, anchor, used)`` at ``now``, or None when the bucket is full.

    A clock that stepped back (``now < anchor``) counts as no time elapsed.
    """
    if state is None:
        return None
    debit, anchor = state
    if now > anchor:
        whole = (now - anchor) // period
        if whole:
            debit -= whole * refill
            anchor += whole * period
        used = debit - (now - anchor) * refill // period
    else:
        used = debit
    if used <= 0:
        return None
    return debit, anchor, used


def refill_time(needed: int, refill: int, period: int) -> int:
    """Milliseconds from the anchor until ``needed`` millitokens have refilled."""
    whole, rest = divmod(needed, refill)
    return whole * period + -(-rest * period // refill)


def bucket_wait(
    level: tuple[int, int, int] | None, now: int, cap: int, refill: int, period: int, amount: int
) -> int:
    """Milliseconds until ``amount`` fits in the bucket (0 when it fits now)."""
    if level is None:
        return 0
    debit, anchor, used = level
    if used + amount <= cap:
        return 0
    return refill_time(debit - cap + amount, refill, period) - max(0, now - anchor)


def bucket_add(level: tuple[int, int, int] | None, now: int, amount: int) -> BucketState | None:
    """Take ``amount`` (negative gives back, never past full); the new state."""
    if level is None:
        return (amount, now) if amount > 0 else None
    debit, anchor, used = level
    if used + amount <= 0:
        return None
    return debit + amount, anchor


def quota_used(state: QuotaState | None, now: int, period: int) -> int:
    """Millitokens used in the current calendar window."""
    if state is None or state[1] != now // period:
        return 0
    return state[0]


def quota_wait(used: int, now: int, cap: int, period: int, amount: int) -> int:
    """Milliseconds until ``amount`` fits: 0, or the time to the next reset."""
    if used + amount <= cap:
        return 0
    return (now // period + 1) * period - now


#: A wait for slots reads at most this many leases, soonest expiry first (lua/entries.lua
#: reads as many members of the key's zset), so that a refusal costs the same with 20,000
#: holders as with one.
SLOTS_READ = 100


def slots_wait(
    used: int, leases: Iterable[tuple[int, int]], now: int, cap: int, amount: int, ttl: int
) -> int:
    """Milliseconds until ``amount`` slots are free if no holder releases early.

    ``used`` slots are held by ``leases``, their ``(slots_mt, expiry_ms)`` in order of
    expiry, expired ones removed (the caller's own lease, which frees nothing for it, as 0
    slots); only a wait reads them, and only as far as it needs, at most `SLOTS_READ`. When
    those free too little (a request of many slots, or a cap lowered below what is held),
    the wait is a conservative guess rather than a scan of every holder: ``ttl``, the
    longest a lease keeps its slots unrenewed, or the expiry of the last lease read if later.
    """
    if used + amount <= cap:
        return 0
    read, wait = 0, 0
    for weight, expiry in leases:
        used -= weight
        read, wait = read + 1, expiry - now
        if used + amount <= cap:
            return max(1, wait)
        if read == SLOTS_READ:
            return max(1, ttl, wait)
    raise AssertionError("unreachable: amount <= cap is checked before")
