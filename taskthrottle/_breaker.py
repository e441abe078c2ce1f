"""`Breaker`: a circuit breaker around an external callee, its state shared by every worker.

The state lives in the store of the limiter the breaker is given, and every transition is
one atomic store operation (one Lua script in Redis; see `_circuit` for the state
machine). A process that starts writes nothing: a breaker with no state is closed, so
neither a new worker nor a store that lost the state reopens or resets it by itself.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, TypeVar, cast

from taskthrottle._entries import check_key
from taskthrottle._exceptions import (
    BreakerOpen,
    InvalidInput,
    InvalidType,
    StoreError,
    Throttled,
)
from taskthrottle._limiter import AsyncLimiter, Limiter
from taskthrottle._store import (
    ENTER,
    FAILURE,
    IGNORE,
    OPEN,
    PEEK,
    SUCCESS,
    BreakerReply,
    BreakerSpec,
)
from taskthrottle._throttle import current_lease

if TYPE_CHECKING:
    from taskthrottle._lease import Lease

log = logging.getLogger("taskthrottle")

P = ParamSpec("P")
R = TypeVar("R")

#: State names, by the number stores keep.
STATES = ("closed", "open", "half-open")
#: A call that passed without the store (it failed): nothing to report.
UNRECORDED = -1

#: Breakers by name, for ``@throttled(breaker=...)``: the latest made under a name.
_registry: dict[str, Breaker] = {}
#: Probe permits the task gates took for a task, by its lease id: breaker name -> round.
_permits: dict[str, dict[str, int]] = {}


class BreakerState(NamedTuple):
    """What `Breaker.state` reports."""

    name: str
    #: "closed", "open" or "half-open".
    state: str
    #: Failures and calls in the window (closed).
    failures: int
    calls: int
    #: Probes in flight, and successful probes so far (half-open).
    probes: int
    successes: int
    #: Seconds before a call could pass (0.0: one can now). While open, the time to
    #: half-open; half-open with every probe slot taken, the time until the first probe
    #: in flight counts as lost (a reported probe frees its slot sooner).
    retry_after: float


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidType(f"{what} must be a whole number, got {value!r}")
    if value < 1:
        raise InvalidInput(f"{what} must be at least 1, got {value!r}")
    return value


def _ms(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(f"{what} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0.001 <= value <= 86_400 * 365):
        raise InvalidInput(f"{what} must be between 0.001 s and a year, got {value!r}")
    return math.ceil(value * 1000)


def _rate(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidType(f"failure_rate must be a number, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InvalidInput(f"failure_rate must be above 0 and at most 1, got {value!r}")
    return max(1, round(value * 1000))


def _exceptions(value: object, what: str) -> tuple[type[BaseException], ...]:
    found = value if isinstance(value, tuple) else (value,)
    for kind in found:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise InvalidType(f"{what} must be exception classes, got {kind!r}")
    return cast(tuple[type[BaseException], ...], found)


def spec_of(
    failure_threshold: int | None,
    failure_rate: float | None,
    minimum_calls: int,
    window: float,
    recovery_timeout: float,
    half_open_max_calls: int,
    success_threshold: int,
    probe_timeout: float | None,
) -> BreakerSpec:
    """The rules as a store takes them, every value checked."""
    if failure_threshold is None and failure_rate is None:
        failure_threshold = 5
    threshold = 0 if failure_threshold is None else _count(failure_threshold, "failure_threshold")
    recovery = _ms(recovery_timeout, "recovery_timeout")
    return BreakerSpec(
        threshold,
        0 if failure_rate is None else _rate(failure_rate),
        _count(minimum_calls, "minimum_calls"),
        _ms(window, "window"),
        recovery,
        _count(half_open_max_calls, "half_open_max_calls"),
        _count(success_threshold, "success_threshold"),
        recovery if probe_timeout is None else _ms(probe_timeout, "probe_timeout"),
    )


class Breaker:
    """A circuit breaker named ``name``, its state in ``limiter``'s store: with a
    `RedisStore` every worker sees the same breaker; with a `MemoryStore`, one process.

    Closed, it counts calls and failures over the last ``window`` seconds and opens on
    the failure that brings them to ``failure_threshold`` (5 when neither rule is given)
    or to a ``failure_rate`` (0..1) of at least ``minimum_calls`` calls. Open, every call
    raises `BreakerOpen` for ``recovery_timeout`` seconds; then half-open, at most
    ``half_open_max_calls`` probes run at once across the fleet, ``success_threshold``
    successful ones close it and a failed one opens it again. A probe not reported within
    ``probe_timeout`` seconds (default: the recovery timeout) counts as lost: its slot is
    free again, and its late report changes nothing.

    An exception of ``failure_exceptions`` is a failure, unless it is of
    ``ignore_exceptions`` (or a `Throttled`, or not an ``Exception``), which do not count;
    any other outcome is a success. Use it as a decorator (sync or async functions), as
    ``with breaker:`` / ``async with breaker:``, or through `call` and `acall`.

    While the store fails, calls pass and are not counted. ``on_change`` is called with
    the name and the new state on every transition this process makes (what it raises is
    logged, never passed on); ``@throttled(breaker=name)`` finds the breaker by its name
    (the latest made in the process).
    """

    def __init__(
        self,
        name: str,
        limiter: Limiter | AsyncLimiter,
        *,
        failure_threshold: int | None = None,
        failure_rate: float | None = None,
        minimum_calls: int = 10,
        window: float = 30.0,
        recovery_timeout: float = 60.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        probe_timeout: float | None = None,
        failure_exceptions: tuple[type[BaseException], ...] = (Exception,),
        ignore_exceptions: tuple[type[BaseException], ...] = (),
        on_change: Callable[[str, str], object] | None = None,
    ) -> None:
        if not isinstance(limiter, (Limiter, AsyncLimiter)):
            raise InvalidType(f"a Breaker keeps its state in a Limiter's store, got {limiter!r}")
        self.name = check_key(name)
        self.limiter = limiter
        self.spec = spec_of(
            failure_threshold,
            failure_rate,
            minimum_calls,
            window,
            recovery_timeout,
            half_open_max_calls,
            success_threshold,
            probe_timeout,
        )
        self.failure_exceptions = _exceptions(failure_exceptions, "failure_exceptions")
        self.ignore_exceptions = _exceptions(ignore_exceptions, "ignore_exceptions")
        self.on_change = on_change
        self._rounds: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
            f"taskthrottle_breaker_{name}", default=()
        )
        _registry[self.name] = self

    def __repr__(self) -> str:
        return f"<Breaker {self.name!r} on {self.limiter.store!r}>"

    # -- the store ---------------------------------------------------------------------

    def _sync(self) -> Limiter:
        if not isinstance(self.limiter, Limiter):
            msg = f"breaker {self.name!r} is on an AsyncLimiter: use acall or async with"
            raise InvalidType(msg)
        return self.limiter

    def _step(self, op: int, probe_round: int = 0) -> BreakerReply | None:
        """One store operation, reported; None when the store failed."""
        try:
            reply = self._sync()._guarded.breaker(self.name, op, probe_round, self.spec)
        except StoreError as exc:
            log.debug("taskthrottle: breaker %r without its store: %s", self.name, exc)
            return None
        self._observe(reply)
        return reply

    async def _astep(self, op: int, probe_round: int = 0) -> BreakerReply | None:
        """The asyncio twin of `_step`."""
        limiter = self.limiter
        try:
            if isinstance(limiter, Limiter):
                reply = limiter._guarded.breaker(self.name, op, probe_round, self.spec)
            else:
                reply = await limiter._guarded.breaker(self.name, op, probe_round, self.spec)
        except StoreError as exc:
            log.debug("taskthrottle: breaker %r without its store: %s", self.name, exc)
            return None
        self._observe(reply)
        return reply

    def _observe(self, reply: BreakerReply) -> None:
        """Log and report a transition this operation made: once across the fleet."""
        if reply.changed < 0:
            return
        state = STATES[reply.changed]
        if reply.changed == OPEN:
            log.warning(
                "taskthrottle: breaker %r opened; calls refused for %.1f s",
                self.name,
                reply.wait_ms / 1000,
            )
        else:
            log.info("taskthrottle: breaker %r is %s", self.name, state)
        _notify(getattr(self.limiter.metrics, "breaker_changed", None), self.name, state)
        _notify(self.on_change, self.name, state)

    def _admit(self, reply: BreakerReply | None) -> int:
        """The round a call passes in, or `BreakerOpen`."""
        if reply is None:
            return UNRECORDED
        if reply.verdict == 0:
            _notify(getattr(self.limiter.metrics, "breaker_refused", None), self.name)
            raise BreakerOpen(self.name, reply.wait_ms / 1000, STATES[reply.state])
        return reply.round

    def _outcome(self, exc: BaseException | None) -> int:
        """How a call's outcome counts: SUCCESS, FAILURE or IGNORE."""
        if exc is None:
            return SUCCESS
        if isinstance(exc, (Throttled, *self.ignore_exceptions)) or not isinstance(exc, Exception):
            return IGNORE
        return FAILURE if isinstance(exc, self.failure_exceptions) else SUCCESS

    # -- entering and leaving ------------------------------------------------------------

    def enter(self) -> int:
        """Ask to pass: the round to report with `leave`, or raises `BreakerOpen`. A probe
        permit the task gate took for the running task is used first."""
        held = _gate_permit(self.name)
        if held is not None:
            return held
        return self._admit(self._step(ENTER))

    def leave(self, probe_round: int, exc: BaseException | None = None) -> None:
        """Report the outcome of a call that `enter` let through in ``probe_round``."""
        if probe_round != UNRECORDED:
            self._step(self._outcome(exc), probe_round)

    async def aenter(self) -> int:
        """The asyncio twin of `enter`."""
        held = _gate_permit(self.name)
        if held is not None:
            return held
        return self._admit(await self._astep(ENTER))

    async def aleave(self, probe_round: int, exc: BaseException | None = None) -> None:
        """The asyncio twin of `leave`."""
        if probe_round != UNRECORDED:
            await self._astep(self._outcome(exc), probe_round)

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` through the breaker."""
        probe_round = self.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.leave(probe_round, exc)
            raise
        self.leave(probe_round)
        return result

    async def acall(self, fn: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` through the breaker."""
        probe_round = await self.aenter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self.aleave(probe_round, exc)
            raise
        await self.aleave(probe_round)
        return result

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` (a function or a coroutine function): each call goes through."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                return await self.acall(fn, *args, **kwargs)

            return cast(Callable[P, R], guarded_async)

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return guarded

    def __enter__(self) -> Breaker:
        self._rounds.set((*self._rounds.get(), self.enter()))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        *rest, probe_round = self._rounds.get()
        self._rounds.set(tuple(rest))
        self.leave(probe_round, exc)

    async def __aenter__(self) -> Breaker:
        probe_round = await self.aenter()
        self._rounds.set((*self._rounds.get(), probe_round))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        *rest, probe_round = self._rounds.get()
        self._rounds.set(tuple(rest))
        await self.aleave(probe_round, exc)

    # -- reading and resetting -----------------------------------------------------------

    def state(self) -> BreakerState:
        """The breaker's state now, read from the store (closed while the store fails)."""
        return _state_of(self.name, self._step(PEEK))

    async def astate(self) -> BreakerState:
        """The asyncio twin of `state`."""
        return _state_of(self.name, await self._astep(PEEK))

    def reset(self) -> None:
        """Close the breaker and empty its window, for every worker."""
        self._sync()._guarded.reset_breaker(self.name)

    async def areset(self) -> None:
        """The asyncio twin of `reset`."""
        limiter = self.limiter
        if isinstance(limiter, Limiter):
            limiter._guarded.reset_breaker(self.name)
        else:
            await limiter._guarded.reset_breaker(self.name)


def _notify(callback: Callable[..., object] | None, *args: str) -> None:
    """Call an observer (``on_change``, a metrics method); what it raises is logged, never
    passed on: the call it observes has passed, or been refused, all the same."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("taskthrottle: breaker observer %r failed", callback)


def _state_of(name: str, reply: BreakerReply | None) -> BreakerState:
    if reply is None:
        return BreakerState(name, "closed", 0, 0, 0, 0, 0.0)
    return BreakerState(
        name,
        STATES[reply.state],
        reply.failures,
        reply.calls,
        reply.probes,
        reply.successes,
        reply.wait_ms / 1000,
    )


def breaker_named(name: str) -> Breaker:
    """The breaker ``@throttled(breaker=name)`` names; `InvalidInput` if none was made."""
    found = _registry.get(name)
    if found is None:
        msg = f"no Breaker named {name!r} was made in this process (made: {sorted(_registry)})"
        raise InvalidInput(msg)
    return found


def _gate_permit(name: str) -> int | None:
    """The probe permit the gate took for the running task's call to breaker ``name``
    (once: a second call asks for itself), or None."""
    lease = current_lease()
    held = None if lease is None else _permits.get(lease.id)
    return None if held is None else held.pop(name, None)


def gate_enter(names: tuple[str, ...], lease: Lease) -> None:
    """Before a throttled task runs under ``lease``: each breaker it names must let a call
    through, or `BreakerOpen`; on that or any other error, every permit taken meanwhile is
    given back. A half-open breaker's probe permit is held for the task's own call."""
    held: dict[str, int] = {}
    try:
        for name in names:
            probe_round = breaker_named(name).enter()
            if probe_round > 0:
                held[name] = probe_round
    except BaseException:
        _give_back(held)
        raise
    if held:
        _permits[lease.id] = held


def gate_leave(lease: Lease) -> None:
    """After the task: give back the probe permits its calls did not use."""
    _give_back(_permits.pop(lease.id, {}))


def _give_back(held: dict[str, int]) -> None:
    for name, probe_round in held.items():
        breaker = _registry.get(name)
        if breaker is not None:
            breaker.leave(probe_round, BreakerOpen(name, 0.0, "half-open"))  # not counted
