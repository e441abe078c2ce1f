"""The gate both integrations share: what one delivery of a throttled task does (run now
under a lease, wait for its turn, or be dropped as a duplicate), and how a lease is
settled after the body. Celery's and Dramatiq's modules only carry its answers to their
broker."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from taskthrottle._breaker import gate_enter, gate_leave
from taskthrottle._exceptions import (
    BreakerOpen,
    InvalidInput,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from taskthrottle._lease import Lease
from taskthrottle._limiter import Limiter
from taskthrottle._settings import Settings, State
from taskthrottle._throttle import Request

log = logging.getLogger("taskthrottle")

#: Seconds between tries to take a held task over while its deferrals do not answer.
TAKE_OVER_RETRY = 1.0


def retry_wait(exc: Throttled, ask: Request, settings: Settings) -> float:
    """When a refused task should try again: its retry-after, except that a full concurrency
    limit, and a half-open breaker whose probe slots are taken, are polled every
    ``slot_poll`` seconds; plus up to ``jitter`` of it at random."""
    kinds = {
        (key, limit.name): limit.kind for key, limits in ask.target.items() for limit in limits
    }
    if isinstance(exc, BreakerOpen) and exc.state == "half-open":
        kinds[(exc.breaker, exc.violations[0].limit)] = "concurrency"
    waits = [
        min(v.retry_after, settings.slot_poll)
        if kinds.get((v.key, v.limit)) == "concurrency"
        else v.retry_after
        for v in exc.violations
    ]
    wait = max(waits, default=exc.retry_after)
    return wait * (1 + settings.jitter * random.random())


class Defer(NamedTuple):
    """A delivery that must wait: hand the task back in ``wait`` seconds, carrying ``meta``
    (the attempt, deferrals so far, and the reservation it holds, if any). ``offline``: the
    store failed, so the task goes back through the broker alone. ``why``: what it waits
    for, for the log (keys and limits, never the task's arguments)."""

    meta: dict[str, Any]
    wait: float
    offline: bool = False
    why: str = "its booked turn"


def book_turn(
    state: State,
    ask: Request,
    message_id: str,
    meta: Mapping[str, Any],
    attempt: int,
    *,
    once: bool = False,
) -> Lease | Defer | None:
    """What one delivery of a throttled task does: run now under a `Lease`, or wait
    (`Defer`). ``attempt`` counts the task's retries: each pays again. A delivery exempt
    from every throttle runs under a lease that calls no store.

    ``once``: this delivery must not run if it was granted before (its message was
    acknowledged before it ran, so a second delivery is a duplicate: a lost ack, a reused
    task id); None then, and it is dropped.

    Granted, the task must still pass the breakers it names (after its limits, so that a
    probe slot is not held by a task that waits for its turn); one that refuses gives the
    lease back and defers the task to when a call could pass. Any other error there (a
    breaker never made in this process) gives the lease back too, and is raised.
    """
    if not ask.target:  # every throttle's key callable said EXEMPT
        return state.limiter().exempt(ask.exempt)
    turn = _book_turn(state, ask, message_id, meta, attempt, once=once)
    if isinstance(turn, Lease):
        turn.exempt = ask.exempt  # the body may adjust the limits it is exempt from: no-ops
    if not (ask.breakers and isinstance(turn, Lease)):
        return turn
    try:
        gate_enter(ask.breakers, turn)
    except BreakerOpen as exc:
        give_back(turn)
        return refused(state, ask, meta, attempt, exc)
    except BaseException:
        give_back(turn)
        raise
    return turn


def refused(
    state: State, ask: Request, meta: Mapping[str, Any], attempt: int, exc: BreakerOpen
) -> Defer:
    """The deferral of a delivery that a breaker refused (at the gate, or in the body)."""
    wait = retry_wait(exc, ask, state.settings)
    return Defer(_again(meta, attempt), wait, why=f"breaker {exc.breaker!r}, {exc.state}")


def _again(meta: Mapping[str, Any], attempt: int) -> dict[str, Any]:
    """The header of the next copy of a delivery carrying ``meta``."""
    if meta.get("attempt", 0) != attempt:  # a retry carries the headers of the attempt before
        meta = {}
    return {"gen": int(_number(meta, "gen")) + 1, "attempt": attempt}


def _book_turn(
    state: State,
    ask: Request,
    message_id: str,
    meta: Mapping[str, Any],
    attempt: int,
    *,
    once: bool = False,
) -> Lease | Defer | None:
    """`book_turn` for the limits alone."""
    limiter, settings = state.limiter(), state.settings
    if meta.get("attempt", 0) != attempt:  # a retry carries the headers of the attempt before
        meta = {}
    generation = int(_number(meta, "gen"))
    booked = meta.get("lease")
    if booked:  # a copy handed back for its booked turn
        lease = _redeem(limiter, booked, ask)
        if lease is not None:
            if time.time() - _number(meta, "due") <= settings.late_after:
                return lease
            give_back(lease)  # far past its turn: it would start with every other late copy
    again = {"gen": generation + 1, "attempt": attempt}
    lease_id = f"{message_id}:{attempt}:{generation}"
    try:
        reservation = limiter.reserve(
            ask.target, consume=ask.consume, max_wait=settings.horizon, lease_id=lease_id
        )
    except StoreUnavailable as exc:
        return Defer(again, exc.retry_after, offline=True, why="the store, unavailable")
    except Throttled as exc:
        why = ", ".join(f"{v.key}/{v.limit}" for v in exc.violations)
        return Defer(again, retry_wait(exc, ask, settings), why=why or "its limits")
    if once and reservation.replayed:
        return None
    if reservation.delay <= 0:
        return reservation.redeem()
    due = time.time() + reservation.delay
    keys = ", ".join(
        f"{key}/{limit.name}" for key, limits in ask.target.items() for limit in limits
    )
    return Defer(
        {**again, "lease": lease_id, "due": due}, reservation.delay, why=f"its turn on {keys}"
    )


def take_over(state: State, task_id: str, token: str | None, prior: str | None) -> str | None:
    """Before a delivery whose hand-back failed runs where it is: a park or a publish that
    failed on the way back (its reply lost) may have been done all the same, and that copy
    must not run too. Makes it stale, waiting while the deferrals do not answer (the task
    is held here meanwhile). Returns the mark that copies this delivery hands back later
    carry as their maker, or None if the stray copy started first (drop this delivery)."""
    warned = False
    while True:
        try:
            owned = state.deferrals().own(task_id, token, prior)
        except StoreError as exc:
            if not warned:
                log.warning(
                    "taskthrottle: holding %s until its deferrals answer (%s)", task_id, exc
                )
                warned = True
            time.sleep(TAKE_OVER_RETRY)
            continue
        return f"body:{token or ''}" if owned else None


def _number(meta: Mapping[str, Any], name: str) -> float:
    """A number of a delivery's header, 0 when it is missing or not a finite number: the
    header comes from whoever published the task."""
    value = meta.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return value


def _redeem(limiter: Limiter, booked: object, ask: Request) -> Lease | None:
    """The lease of a booked turn: acquiring again with its id replays the booking, which
    the store remembers until the turn and a minute more, charging nothing. A forged,
    copied or stale header names a lease the store never booked (or forgot), so this
    charges it like a first delivery; None when that is refused."""
    if not isinstance(booked, str):
        return None
    try:
        return limiter.redeem(booked, ask.target, consume=ask.consume)
    except (Throttled, InvalidInput):
        return None


def give_back(lease: Lease) -> None:
    """Refund a booked turn that was not used, and free its slots; best effort."""
    try:
        spent = {name: -amount for name, amount in lease.consumed.items() if amount}
        if spent:
            lease.adjust(**spent)
        lease.release()
    except StoreError as exc:
        log.debug("taskthrottle: could not give back lease %s: %s", lease.id, exc)


def settle(lease: Lease, settings: Settings, *, failed: bool) -> None:
    """After the body, whatever happened: give back the breaker probes it did not use,
    refund on failure if asked, and free the slots. A store that fails here was logged as
    an outage; the slots then expire by their TTL."""
    gate_leave(lease)
    if failed and settings.on_failure == "refund":
        give_back(lease)
        return
    try:
        lease.release()
    except StoreError as exc:
        log.debug("taskthrottle: could not release lease %s: %s", lease.id, exc)
