"""The arithmetic of buckets, windows, quotas and slots: pure functions of state and time.

`MemoryStore` runs these; the Lua scripts in ``lua/`` mirror them line for line,
and the contract tests hold the two to identical answers.

A token bucket is kept as ``(debit, anchor)``: ``debit`` millitokens were taken
since the bucket was last full, counted from ``anchor`` (ms). What has refilled
since is ``elapsed * refill // period``, computed from the anchor every time, so
rounding never accumulates. Whole periods are folded into the anchor to keep the
product below 2**53. A full bucket has no state at all.

A fixed window (and a calendar quota, its special case) is kept as ``(used, window)``:
``used`` millitokens counted in window ``window`` (``now // period``, so that windows are
aligned to the epoch). A window over its cap is in debt: each later window starts with
what went past the cap, less one cap per window gone by.

A sliding window is kept as ``(count, previous, window)``: the counts of the current
window and the one before (at most the cap; what went past it carries as above). What it
holds now is ``count`` plus ``previous`` weighed by the part of the previous window still
inside the last period, rounded up: the sliding window counter, exact when the previous
window's use was spread evenly (see docs/strategies.md for its bound).
"""

from __future__ import annotations

from collections.abc import Iterable

BucketState = tuple[int, int]  # (debit_mt, anchor_ms)
WindowState = tuple[int, int]  # (used_mt, window_index): a fixed window or a quota
QuotaState = WindowState
SlidingState = tuple[int, int, int]  # (count_mt, previous_mt, window_index)


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


def window_level(state: WindowState | None, now: int, cap: int, period: int) -> WindowState:
    """A fixed window's ``(used, window)`` at ``now``: what its window counts, debt carried
    from earlier windows. A clock that stepped back keeps the stored window."""
    if state is None:
        return 0, now // period
    used, window = state
    passed = now // period - window
    if passed <= 0:
        return used, window
    if passed >= -(-used // cap):  # the debt is repaid (and no product can grow large)
        return 0, window + passed
    return used - passed * cap, window + passed


def window_wait(level: WindowState, now: int, cap: int, period: int, amount: int) -> int:
    """Milliseconds until ``amount`` fits: 0, or the time to the start of the first window
    in which it does (the next one, unless debt carries further)."""
    used, window = level
    if used + amount <= cap:
        return 0
    windows = -(-(used + amount - cap) // cap)
    return (window + windows) * period - now


def window_add(level: WindowState, amount: int) -> WindowState | None:
    """Count ``amount`` in the window (negative gives back, never below zero)."""
    used = level[0] + amount
    return (used, level[1]) if used > 0 else None


def window_until(state: WindowState, cap: int, period: int) -> int:
    """When (ms) a fixed window's state counts nothing any more."""
    return (state[1] + -(-state[0] // cap)) * period


SlidingLevel = tuple[int, int, int, int]  # (count_mt, previous_mt, window_index, used_mt)


def sliding_level(state: SlidingState | None, now: int, cap: int, period: int) -> SlidingLevel:
    """A sliding window's ``(count, previous, window, used)`` at ``now``.

    Each window gone by moves up to a cap of the count into ``previous`` and carries the
    rest (debt). ``used`` is ``count`` plus ``previous`` weighed by the share of the
    previous window still within the last period, rounded up. A clock that stepped back
    keeps the stored window, and weighs ``previous`` fully.
    """
    if state is None:
        return 0, 0, now // period, 0
    count, previous, window = state
    passed = now // period - window
    if passed > 0:
        if passed > -(-count // cap) + 1:  # all gone by (and no product can grow large)
            count = previous = 0
        else:
            previous = min(cap, max(0, count - (passed - 1) * cap))
            count = max(0, count - passed * cap)
        window += passed
    elapsed = max(0, now - window * period)
    return count, previous, window, count + previous - previous * elapsed // period


def sliding_wait(level: SlidingLevel, now: int, cap: int, period: int, amount: int) -> int:
    """Milliseconds until ``amount`` fits: the first instant at which the weighed previous
    window has shrunk enough, in this window or a later one."""
    count, previous, window, used = level
    if used + amount <= cap:
        return 0
    amount = min(amount, cap)  # only a settle asks with more, and reads no wait
    first = 0 if count + amount <= cap else -(-(count + amount - cap) // cap)
    for ahead in (first, first + 1):
        if ahead:
            count_then = max(0, count - ahead * cap)
            previous_then = min(cap, max(0, count - (ahead - 1) * cap))
        else:
            count_then, previous_then = count, previous
        room = cap - amount - count_then
        if previous_then <= room:
            at = 0
        elif room > 0:  # previous_then - previous_then * at // period <= room from `at` on
            at = -(-(previous_then - room) * period // previous_then)
        else:
            continue
        return (window + ahead) * period + at - now
    raise AssertionError("unreachable: the window after the first one that fits is empty")


def sliding_add(level: SlidingLevel, amount: int) -> SlidingState | None:
    """Count ``amount`` in the current window (negative gives back, never below zero and
    never from the previous window)."""
    count, previous, window, _ = level
    count = max(0, count + amount)
    if count == 0 and previous == 0:
        return None
    return count, previous, window


def sliding_until(state: SlidingState, cap: int, period: int) -> int:
    """When (ms) a sliding window's state counts nothing any more."""
    return (state[2] + -(-state[0] // cap) + 1) * period


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
