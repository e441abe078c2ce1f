"""Settings shared by the task-queue integrations, and the state each keeps: a limiter and
its deferrals, made once per worker process."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from taskthrottle._breaker import gate_enter, gate_leave
from taskthrottle._deferrals import Deferrals, deferrals_for
from taskthrottle._exceptions import (
    BreakerOpen,
    InvalidInput,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from taskthrottle._lease import Lease
from taskthrottle._limiter import Limiter
from taskthrottle._outage import POLICIES, check_policy
from taskthrottle._throttle import Request, Throttle, throttle_spec

log = logging.getLogger("taskthrottle")

#: The furthest ahead (seconds) a task may book its turn: a turn further away is refused and
#: tried again later, so that no task holds a reservation, nor a run key, for days.
MAX_HORIZON = 3_600.0
#: Seconds between tries to take a held task over while its deferrals do not answer.
TAKE_OVER_RETRY = 1.0

_CHOICES = {
    "on_failure": ("keep", "refund"),
    "eager": ("wait", "bypass"),
    "on_store_error": (None, *POLICIES),
}


@dataclass(frozen=True)
class Settings:
    """How the gate behaves. Celery reads each field from ``app.conf.taskthrottle_<field>``
    too; Dramatiq takes them as keyword arguments of the middleware."""

    #: Seconds ahead a task may book its turn; beyond it the task comes back at retry-after.
    horizon: float = 300.0
    #: Random extra share of a retry-after, so that refused tasks do not all return at once.
    jitter: float = 0.1
    #: A turn further away than this many seconds is parked in the store, not in a worker.
    park_after: float = 5.0
    #: Parked tasks are published again this many seconds before their turn.
    park_lead: float = 2.0
    #: How often (seconds) each worker looks for parked tasks that are due.
    park_poll: float = 0.5
    #: Tokens a failed (raised, retried, timed-out) task consumed: "keep" or "refund".
    on_failure: str = "keep"
    #: In eager mode (``task_always_eager``, ``.apply()``): "wait" inline or "bypass".
    eager: str = "wait"
    #: When the store fails: "defer" the task (by ``store_retry`` seconds), "allow" it, or
    #: decide "local"ly with ``local_share`` of each limit; None keeps the limiter's own.
    on_store_error: str | None = None
    #: Seconds to defer a task by when the store failed.
    store_retry: float = 5.0
    #: Under ``on_store_error="local"``: the part of each limit one worker process takes.
    local_share: float | None = None
    #: A copy that comes back this many seconds past its booked turn books again.
    late_after: float = 1.0
    #: At most this many seconds between tries for a full concurrency limit: a slot is
    #: usually freed long before its holder's lease could expire.
    slot_poll: float = 1.0
    #: ``throttled(**default)`` for every task that has no throttle of its own.
    default: Mapping[str, Any] | None = None
    #: Where a limiter is built from when ``install`` is given none.
    redis_url: str | None = field(default=None, repr=False)  # it may carry a password
    #: The Redis parked tasks live in; by default the broker's when it is Redis, else the
    #: limiter's store.
    park_url: str | None = field(default=None, repr=False)
    #: The namespace of limits built from ``redis_url``; by default one of the app's own
    #: (``taskthrottle.celery.<app name>``): apps share limits only when they say so.
    namespace: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                msg = f"taskthrottle {name} must be one of {allowed}, got {getattr(self, name)!r}"
                raise InvalidInput(msg)
        numbers = ("horizon", "jitter", "park_after", "park_lead", "park_poll", "store_retry")
        for name in (*numbers, "slot_poll", "late_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"taskthrottle {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"taskthrottle {name} must be finite and >= 0, got {value!r}")
        if self.horizon > MAX_HORIZON:
            msg = f"taskthrottle horizon must be at most {MAX_HORIZON:g} s, got {self.horizon!r}"
            raise InvalidInput(msg)
        if self.on_store_error is not None:
            check_policy(self.on_store_error, self.local_share)
        if self.park_poll <= 0:
            raise InvalidInput(f"taskthrottle park_poll must be above 0, got {self.park_poll!r}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], **overrides: Any) -> Settings:
        """Settings from ``taskthrottle_*`` keys of a Celery configuration, then overrides."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidInput(f"unknown taskthrottle settings {unknown} (known: {sorted(names)})")
        found = {name: conf.get(f"taskthrottle_{name}") for name in names}
        given = {name: value for name, value in found.items() if value is not None}
        return cls(**(given | overrides))


class State:
    """What one integration holds: settings, and a limiter and deferrals made once per
    process. ``parking`` makes the Redis client that parked tasks live in (the broker's,
    where the broker is Redis); None parks them beside the limiter's state. ``app`` names
    whose parked tasks they are: a worker releases its own app's only."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter | Callable[[], Limiter] | None,
        parking: Callable[[], Any] | None = None,
        app: str = "default",
    ):
        self.settings = settings
        self._source = limiter
        self._limiter: Limiter | None = None
        self._parking = parking
        self._app = app
        self._deferrals: Deferrals | None = None
        self.default: tuple[Throttle, ...] = ()
        if settings.default:
            default = dict(settings.default)
            limits = default.pop("limits", ())
            key, consume = default.pop("key", None), default.pop("consume", None)
            breaker = default.pop("breaker", None)
            self.default = (throttle_spec(tuple(limits), key, consume, default, breaker),)
        if isinstance(limiter, Limiter):
            self._limiter = self._configure(limiter)

    def limiter(self) -> Limiter:
        """This process's limiter, made on first use (so after a prefork worker forks)."""
        if self._limiter is None:
            if callable(self._source):
                made = self._source()
            elif self.settings.redis_url:
                from taskthrottle._redis import RedisStore

                url = self.settings.redis_url
                made = Limiter(RedisStore.from_url(url, namespace=self.namespace()))
            else:
                made = Limiter()
            self._limiter = self._configure(made)
        return self._limiter

    def _configure(self, limiter: Limiter) -> Limiter:
        """The integration's store-failure settings, passed on to the limiter."""
        settings = self.settings
        if settings.on_store_error is not None:
            limiter.on_store_error = check_policy(settings.on_store_error, settings.local_share)
            limiter.local_share = settings.local_share
            limiter.store_retry = settings.store_retry
        return limiter

    def namespace(self) -> str:
        """The namespace of limits built from ``redis_url``, and of parked tasks beside a
        store that is not Redis: the setting, else one of the app's own."""
        return self.settings.namespace or f"taskthrottle.{self._app}"

    def parking_unset(self) -> bool:
        """True until an integration said where to park (before the first deferral)."""
        return self._parking is None and self._deferrals is None

    def park_with(self, parking: Callable[[], Any], app: str) -> None:
        """Where parked tasks live, and whose they are, as `State` takes them; before the
        first deferral."""
        self._parking, self._app = parking, app

    def deferrals(self) -> Deferrals:
        """Parking and run tokens: in the broker's Redis when ``parking`` gives one."""
        if self._deferrals is None:
            client = None if self._parking is None else self._parking()
            store, namespace = self.limiter().store, self.namespace()
            self._deferrals = deferrals_for(store, client, namespace, self._app)
        return self._deferrals


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
    (`Defer`). ``attempt`` counts the task's retries: each pays again.

    ``once``: this delivery must not run if it was granted before (its message was
    acknowledged before it ran, so a second delivery is a duplicate: a lost ack, a reused
    task id); None then, and it is dropped.

    Granted, the task must still pass the breakers it names (after its limits, so that a
    probe slot is not held by a task that waits for its turn); one that refuses gives the
    lease back and defers the task to when a call could pass.
    """
    turn = _book_turn(state, ask, message_id, meta, attempt, once=once)
    if not (ask.breakers and isinstance(turn, Lease)):
        return turn
    try:
        gate_enter(ask.breakers, turn)
    except BreakerOpen as exc:
        give_back(turn)
        return refused(state, ask, meta, attempt, exc)
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
