"""The circuit breaker's state machine: a pure function of stored fields and time.

`MemoryStore` runs `step`; ``lua/breaker.lua`` mirrors it line for line, and the store
contract tests hold the two to identical answers. A breaker is a handful of integer
fields, named as in the Redis hash:

    s            state: CLOSED (also: no fields at all), OPEN or HALF_OPEN
    u            OPEN: until when (ms); HALF_OPEN: when it was due to half-open
    k            HALF_OPEN: successful probes
    q<id>        HALF_OPEN: a probe in flight, by its id, and when it counts as lost (ms):
                 each probe has a deadline of its own, and a prober that died frees its
                 slot by itself ``probe_timeout`` after it was let through
    n            the latest probe id given out (each id is at least the time it was given,
                 and above every id before it: kept across states, never reused)
    c<j> f<j> i<j>  CLOSED: calls and failures in slice j of the window, and which slice
                 of time (now // slice width) it holds; ``SLICES`` slices make the window

Only a call passed while closed (round 0) counts in the window, and only a probe in
flight (its field still there, its deadline not passed) moves half-open: an outcome that
arrives late, from an earlier state or from a probe counted as lost, is dropped. So at
most ``half_open_max_calls`` probes run at once that are not yet lost. Every transition
is made by exactly one operation, which reports it.
"""

from __future__ import annotations

import threading

from taskthrottle._store import (
    CLOSED,
    ENTER,
    FAILURE,
    HALF_OPEN,
    OPEN,
    PEEK,
    SUCCESS,
    BreakerReply,
    BreakerSpec,
)

#: The window is kept as this many slices: it slides by a tenth of its length.
SLICES = 10
#: Stored state outlives what it must remember by this much (ms).
SLACK_MS = 60_000

Fields = dict[str, int]


def window_counts(fields: Fields, now: int, window: int) -> tuple[int, int]:
    """Calls and failures in the window's live slices."""
    current = now // -(-window // SLICES)
    calls = failures = 0
    for j in range(SLICES):
        held = fields.get(f"i{j}")
        if held is not None and held > current - SLICES:
            calls += fields.get(f"c{j}", 0)
            failures += fields.get(f"f{j}", 0)
    return calls, failures


def _count(fields: Fields, now: int, window: int, failed: bool) -> None:
    """Count one call (a failure if ``failed``) in the current slice."""
    current = now // -(-window // SLICES)
    j = current % SLICES
    if fields.get(f"i{j}") != current:
        fields[f"i{j}"], fields[f"c{j}"], fields[f"f{j}"] = current, 0, 0
    fields[f"c{j}"] = fields.get(f"c{j}", 0) + 1
    fields[f"f{j}"] = fields.get(f"f{j}", 0) + int(failed)


def trips(calls: int, failures: int, spec: BreakerSpec) -> bool:
    """Whether the window's counts open the breaker."""
    if spec.threshold and failures >= spec.threshold:
        return True
    return bool(spec.rate) and calls >= spec.minimum_calls and failures * 1000 >= spec.rate * calls


def _clear(fields: Fields) -> None:
    """Forget every field but the latest probe id."""
    latest = fields.get("n")
    fields.clear()
    if latest is not None:
        fields["n"] = latest


def _open(fields: Fields, now: int, spec: BreakerSpec) -> None:
    _clear(fields)
    fields["s"], fields["u"] = OPEN, now + spec.recovery


def _live_probes(fields: Fields, now: int, purge: bool) -> dict[str, int]:
    """The probes in flight (field -> deadline) whose deadline has not passed; with
    ``purge``, the fields of the lost ones are dropped."""
    live = {}
    for name in [name for name in fields if name[0] == "q"]:
        if fields[name] > now:
            live[name] = fields[name]
        elif purge:
            del fields[name]
    return live


def step(
    fields: Fields, now: int, op: int, probe_round: int, spec: BreakerSpec
) -> tuple[BreakerReply, bool]:
    """Apply ``op`` to ``fields`` (in place) at ``now``: the reply, and whether the
    fields changed (a store then writes them, or drops them when empty)."""
    state, until = fields.get("s", CLOSED), fields.get("u", 0)
    changed, dirty = -1, False
    if state == OPEN and now >= until:
        state = HALF_OPEN  # the clock's own transition, made by the first to write
        if op != PEEK:
            fields["s"], fields["k"] = HALF_OPEN, 0
            changed, dirty = HALF_OPEN, True
    held = len(fields)
    live = _live_probes(fields, now, purge=op != PEEK)
    dirty = dirty or len(fields) != held
    verdict, probe_id = 1, 0
    if op in (ENTER, PEEK):
        if state == OPEN:
            verdict = 0
        elif state == HALF_OPEN:
            verdict = 2 if len(live) < spec.probes else 0
            if verdict and op == ENTER:
                probe_id = max(now, fields.get("n", 0) + 1)
                fields["n"], fields[f"q{probe_id}"] = probe_id, now + spec.probe_timeout
                live[f"q{probe_id}"], dirty = now + spec.probe_timeout, True
    elif state == CLOSED and probe_round == 0 and op in (SUCCESS, FAILURE):
        _count(fields, now, spec.window, op == FAILURE)
        dirty = True
        if op == FAILURE and trips(*window_counts(fields, now, spec.window), spec):
            _open(fields, now, spec)
            state, until, changed = OPEN, fields["u"], OPEN
    elif state == HALF_OPEN and f"q{probe_round}" in live:
        del fields[f"q{probe_round}"], live[f"q{probe_round}"]
        dirty = True
        if op == SUCCESS:
            fields["k"] = fields.get("k", 0) + 1
            if fields["k"] >= spec.successes:
                _clear(fields)
                state, changed = CLOSED, CLOSED
        elif op == FAILURE:
            _open(fields, now, spec)
            state, until, changed = OPEN, fields["u"], OPEN
    return _reply(fields, now, state, until, live, verdict, probe_id, changed, spec), dirty


def _reply(
    fields: Fields,
    now: int,
    state: int,
    until: int,
    live: dict[str, int],
    verdict: int,
    probe_id: int,
    changed: int,
    spec: BreakerSpec,
) -> BreakerReply:
    calls = failures = successes = probes = wait = 0
    if state == CLOSED:
        calls, failures = window_counts(fields, now, spec.window)
    elif state == OPEN:
        wait = until - now
    else:
        successes, probes = fields.get("k", 0), len(live)
        if probes >= spec.probes:
            wait = max(1, min(live.values()) - now)  # the first probe counted as lost
    return BreakerReply(
        verdict, wait, state, calls, failures, probes, successes, probe_id, changed, now
    )


def ttl(fields: Fields, now: int, spec: BreakerSpec) -> int:
    """How long (ms) stored fields must live: the window, and an open state's time, its
    half-open probes' (each lost at most ``probe_timeout`` from now) and a window more
    after it."""
    if fields.get("s", CLOSED) == CLOSED:
        return spec.window + SLACK_MS
    return max(fields.get("u", 0), now) - now + spec.probe_timeout + spec.window + SLACK_MS


class Breakers:
    """The breakers of one process, by name: `step` under a lock, each breaker dropped
    when its state expires, as its Redis hash would (`MemoryStore`'s breakers)."""

    def __init__(self) -> None:
        self._fields: dict[str, tuple[Fields, int]] = {}  # name -> (fields, expiry ms)
        self._lock = threading.Lock()

    def step(
        self, name: str, now: int, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        """`step` on breaker ``name``'s state, kept when it changed."""
        with self._lock:
            fields, expires = self._fields.get(name, ({}, 0))
            if expires <= now:
                fields = {}
            reply, dirty = step(fields, now, op, probe_round, spec)
            if dirty:
                if fields:
                    self._fields[name] = fields, now + ttl(fields, now, spec)
                else:
                    self._fields.pop(name, None)
        return reply

    def reset(self, name: str) -> None:
        """Forget breaker ``name``: it is closed, its window empty."""
        with self._lock:
            self._fields.pop(name, None)
