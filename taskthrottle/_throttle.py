"""`throttled`: the limits a task needs, recorded on the function for an integration to enforce.

The decorator knows nothing of Celery or Dramatiq: it stores `Throttle` specs on
the function, and `plan` turns them, with a call's arguments, into one
all-or-nothing request for `Limiter.reserve`.
"""

from __future__ import annotations

import contextvars
import inspect
import re
import string
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from taskthrottle._entries import milli_amount
from taskthrottle._exceptions import InvalidInput, InvalidType
from taskthrottle._lease import Lease
from taskthrottle._limits import Limit, Strategy, check_strategy


class Exempt:
    """The type of `EXEMPT`, of which there is one."""

    def __repr__(self) -> str:
        return "EXEMPT"

    def __reduce__(self) -> str:
        return "EXEMPT"  # pickles as the one instance


#: What a key callable of `throttled` returns for a call exempt from that throttle: its
#: limits (and breaker) are skipped, and a task exempt from all of its throttles runs with
#: no store call at all, counted by the metrics as exempt.
EXEMPT = Exempt()

F = TypeVar("F")
KeySpec = str | Callable[..., "str | Exempt"]
Amount = float | Callable[..., float]

#: The attribute `throttled` stores its specs under.
ATTRIBUTE = "__taskthrottle__"

#: Keyword limits and their periods (seconds); "concurrency" has none.
_KEYWORDS: dict[str, float] = {
    "rps": 1.0,
    "rpm": 60.0,
    "rph": 3600.0,
    "rpd": 86400.0,
    "tps": 1.0,
    "tpm": 60.0,
    "tph": 3600.0,
    "tpd": 86400.0,
    "concurrency": 0.0,
}


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def burst_seconds(burst: float | str) -> float:
    """The span a keyword limit's bucket holds, in seconds: a number of seconds, or a
    string such as ``"10s"``, ``"500ms"``, ``"2m"``."""
    if isinstance(burst, str):
        found = _DURATION.fullmatch(burst)
        if found is None:
            msg = f"burst must be seconds or a duration like '10s', '500ms', '2m'; got {burst!r}"
            raise InvalidInput(msg)
        seconds = float(found[1]) * _UNITS[found[2]]
    elif isinstance(burst, (int, float)) and not isinstance(burst, bool):
        seconds = float(burst)
    else:
        raise InvalidType(f"burst must be seconds or a duration like '10s', got {burst!r}")
    if not (0 < seconds <= 86400):
        raise InvalidInput(f"burst must be more than 0 s and at most a day, got {burst!r}")
    return seconds


def _keyword_limit(
    name: str, value: float, strategy: Strategy, burst: float | str | None = None
) -> Limit:
    if name == "concurrency":
        return Limit.concurrency(name, value)
    period = _KEYWORDS[name]
    if burst is None:
        return Limit.per_period(name, value, period, strategy=strategy)
    if strategy != "token_bucket":
        msg = f"throttled(burst={burst!r}) applies to token buckets, not strategy={strategy!r}"
        raise InvalidInput(msg)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidType(f"limit {name!r} must be a number, got {value!r}")
    capacity = round(value * burst_seconds(burst) / period, 3)  # limits count millis
    if capacity < 1:
        msg = (
            f"burst={burst!r} gives {name}={value:g} a bucket of {capacity:g}, less than "
            "one unit: no request could ever pass; give a longer burst"
        )
        raise InvalidInput(msg)
    return Limit.per_period(name, value, period, burst=capacity, strategy=strategy)


@dataclass(frozen=True)
class Throttle:
    """One ``@throttled(...)``: limits under one key, and what a call consumes."""

    limits: tuple[Limit, ...]
    #: A format string over the task's arguments (``"tenant:{tenant_id}"``) or a callable
    #: of them; None means the task's own name.
    key: KeySpec | None = None
    consume: Mapping[str, Amount] = field(default_factory=dict)
    #: The name of a `Breaker` the task waits for while it refuses calls.
    breaker: str | None = None


def throttled(
    *limits: Limit,
    key: KeySpec | None = None,
    consume: Mapping[str, Amount] | None = None,
    rps: float | None = None,
    rpm: float | None = None,
    rph: float | None = None,
    rpd: float | None = None,
    tps: float | None = None,
    tpm: float | None = None,
    tph: float | None = None,
    tpd: float | None = None,
    concurrency: float | None = None,
    breaker: str | None = None,
    strategy: Strategy = "token_bucket",
    burst: float | str | None = None,
) -> Callable[[F], F]:
    """Record limits on a task function; the Celery and Dramatiq integrations enforce them.

    Keyword limits (``rpm=500``, ``tpm=90_000``, ``concurrency=4``) become limits of those
    names, counted by ``strategy`` ("token_bucket", "fixed_window" or "sliding_window");
    `Limit` objects may be given too. ``key`` says whose budget is spent: a template over
    the task's arguments, or a callable of them, which may return `EXEMPT` to skip this
    throttle for that call. ``consume`` maps limit names to amounts or to callables of the
    task's arguments. Stacked ``@throttled`` decorators form one all-or-nothing lease.
    ``burst`` is the span the keyword limits' buckets hold (``"10s"``: rpm=180 bursts to
    30 requests); by default a bucket holds a whole period (rpm=180 bursts to 180), which
    providers that enforce over shorter spans answer with 429s. ``breaker`` names a
    `Breaker`: while it refuses calls the task waits, rescheduled like a throttled one.
    """
    given = {"rps": rps, "rpm": rpm, "rph": rph, "rpd": rpd, "tps": tps, "tpm": tpm}
    given |= {"tph": tph, "tpd": tpd, "concurrency": concurrency}
    spec = throttle_spec(limits, key, consume, given, breaker, strategy, burst)

    def decorate(func: F) -> F:
        check_key_fields(spec, func)
        stacked: tuple[Throttle, ...] = getattr(func, ATTRIBUTE, ())
        throttles = (*stacked, spec)
        _check_consume_conflicts(throttles)
        setattr(func, ATTRIBUTE, throttles)
        return func

    return decorate


def throttle_spec(
    limits: tuple[Limit, ...] | list[Limit],
    key: KeySpec | None,
    consume: Mapping[str, Amount] | None,
    keywords: Mapping[str, float | None],
    breaker: str | None = None,
    strategy: Strategy = "token_bucket",
    burst: float | str | None = None,
) -> Throttle:
    """The `Throttle` one ``throttled(...)`` records, checked; ``keywords`` are the keyword
    limits (``{"rpm": 500}``), counted by ``strategy``, their buckets holding ``burst``."""
    if breaker is not None and not (isinstance(breaker, str) and breaker):
        raise InvalidType(f"breaker must name a Breaker, got {breaker!r}")
    unknown = sorted(set(keywords) - set(_KEYWORDS))
    if unknown:
        raise InvalidInput(f"unknown keyword limits {unknown} (known: {sorted(_KEYWORDS)})")
    check_strategy(strategy, "throttled()")
    if strategy != "token_bucket" and not any(
        value is not None for name, value in keywords.items() if name != "concurrency"
    ):
        msg = (
            f"throttled(strategy={strategy!r}) applies to keyword limits (rpm=..., tph=...), "
            "and none is given: give a Limit its strategy instead"
        )
        raise InvalidInput(msg)
    if burst is not None and not any(
        value is not None for name, value in keywords.items() if name != "concurrency"
    ):
        msg = (
            f"throttled(burst={burst!r}) applies to keyword limits (rpm=..., tpm=...), and "
            "none is given: give a Limit its burst instead"
        )
        raise InvalidInput(msg)
    built = [
        _keyword_limit(name, value, strategy, burst)
        for name, value in keywords.items()
        if value is not None
    ]
    for limit in limits:
        if not isinstance(limit, Limit):
            msg = f"throttled() takes Limit objects and keyword limits, got {limit!r}"
            raise InvalidType(msg)
    spec = Throttle((*limits, *built), key, dict(consume or {}), breaker)
    _check(spec)
    return spec


def key_fields(key: str) -> set[str]:
    """The argument names a key template formats (``{"tenant"}`` for "t:{tenant.id}")."""
    try:
        parsed = list(string.Formatter().parse(key))
    except ValueError as exc:
        raise InvalidInput(f"key template {key!r} is malformed: {exc}") from exc
    fields = set()
    for _, formatted, _, _ in parsed:
        if formatted is None:
            continue
        name = formatted.split(".", 1)[0].split("[", 1)[0]
        if not name.isidentifier():
            msg = f"key template {key!r} must name the task's arguments, got {{{formatted}}}"
            raise InvalidInput(msg)
        fields.add(name)
    return fields


def check_key_fields(spec: Throttle, func: object) -> None:
    """Refuse a key template naming an argument ``func`` does not take, now rather than
    when the first task runs."""
    if not (isinstance(spec.key, str) and callable(func)):
        return
    fields = key_fields(spec.key)
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin, say: nothing to check against
        return
    if not fields or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    missing = sorted(fields - set(params))
    if missing:
        name = getattr(func, "__qualname__", repr(func))
        msg = (
            f"key {spec.key!r} names {', '.join(missing)}, which {name}() does not take "
            f"(it takes {', '.join(params) or 'no arguments'})"
        )
        raise InvalidInput(msg)


def _check(spec: Throttle) -> None:
    if not spec.limits:
        raise InvalidInput("throttled() needs at least one limit")
    names = [limit.name for limit in spec.limits]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise InvalidInput(f"throttled() got two limits named {duplicated}")
    if spec.key is not None and not (isinstance(spec.key, str) or callable(spec.key)):
        raise InvalidType(f"key must be a format string or a callable, got {spec.key!r}")
    if isinstance(spec.key, str):
        key_fields(spec.key)
    unknown = sorted(set(spec.consume) - set(names))
    if unknown:
        msg = (
            f"consume names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
            f"not among this throttle's limits ({', '.join(names)})"
        )
        raise InvalidInput(msg)
    for name, amount in spec.consume.items():
        if callable(amount):
            continue
        if not isinstance(amount, (int, float)):
            raise InvalidType(f"consume[{name!r}] must be a number or a callable, got {amount!r}")
        milli_amount(amount, "consume[{!r}]", name)


def _check_consume_conflicts(throttles: tuple[Throttle, ...]) -> None:
    seen: dict[str, Amount] = {}
    for spec in throttles:
        for name, amount in spec.consume.items():
            if name in seen and seen[name] is not amount:
                msg = f"stacked throttles give two consume amounts for {name!r}; give it once"
                raise InvalidInput(msg)
            seen[name] = amount


def throttles_of(task: object) -> tuple[Throttle, ...]:
    """The throttles recorded on a task object or on its function (``run``, ``fn``)."""
    for candidate in (task, getattr(task, "run", None), getattr(task, "fn", None)):
        found = getattr(candidate, ATTRIBUTE, None)
        if found:
            return tuple(found)
    return ()


@dataclass(frozen=True)
class Request:
    """What a call of a throttled task asks for: keys with their limits, and amounts."""

    target: dict[str, list[Limit]]
    consume: dict[str, float]
    #: The breakers the task waits for, by name.
    breakers: tuple[str, ...] = ()
    #: The limits of throttles whose key callable returned `EXEMPT` for this call (those
    #: that no other throttle of the call charges); no target at all: the call is exempt.
    exempt: frozenset[str] = frozenset()


def plan(
    throttles: tuple[Throttle, ...],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    default_key: str,
) -> Request:
    """The request a call makes: every throttle's key formatted with the call's arguments.
    A throttle whose key callable returns `EXEMPT` is skipped, limits and breaker; the
    amounts of ``consume`` are computed only for the limits still charged."""
    bound: dict[str, Any] | None = None
    target: dict[str, list[Limit]] = {}
    consume: dict[str, float] = {}
    kept: list[Throttle] = []
    skipped: set[str] = set()
    for spec in throttles:
        if bound is None and isinstance(spec.key, str) and "{" in spec.key:
            bound = _arguments(func, args, kwargs)
        key = _key(spec.key, default_key, bound or {}, func, args, kwargs)
        if isinstance(key, Exempt):
            skipped.update(limit.name for limit in spec.limits)
            continue
        kept.append(spec)
        target.setdefault(key, []).extend(spec.limits)
    charged = {limit.name for limits in target.values() for limit in limits}
    for spec in throttles:  # a consume of one throttle may name another's limit
        for name, amount in spec.consume.items():
            if name in charged:
                consume[name] = amount(*args, **kwargs) if callable(amount) else amount
    breakers = tuple(dict.fromkeys(spec.breaker for spec in kept if spec.breaker))
    return Request(target, consume, breakers, frozenset(skipped - charged))


def _arguments(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _key(
    spec: KeySpec | None,
    default: str,
    bound: dict[str, Any],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> str | Exempt:
    if spec is None:
        return default
    if callable(spec):
        key = spec(*args, **kwargs)
        return key if key is EXEMPT else str(key)
    try:
        return _KEY_FORMATTER.format(spec, **bound)
    except (KeyError, IndexError) as exc:
        msg = f"key {spec!r} names {exc} which {func.__qualname__}() was not called with"
        raise InvalidInput(msg) from exc


class _KeyFormatter(string.Formatter):
    """Formats key templates with each value escaped, so that a value cannot forge another
    key: ``org:{org}`` with org ``"7:user:9"`` gives ``org:7%3Auser%3A9``, never the key of
    ``org:{org}:user:{user}``."""

    def format_field(self, value: Any, format_spec: str) -> str:
        text: str = super().format_field(value, format_spec)
        return text.replace("%", "%25").replace(":", "%3A")


_KEY_FORMATTER = _KeyFormatter()

_current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "taskthrottle_lease", default=None
)


def current_lease() -> Lease | None:
    """The lease of the throttled task running now (for `Lease.adjust`), or None."""
    return _current.get()


def enter_lease(lease: Lease) -> contextvars.Token[Lease | None]:
    """Make ``lease`` the `current_lease` until `leave_lease` is given the returned token:
    for a middleware whose body runs between two hooks."""
    return _current.set(lease)


def leave_lease(token: contextvars.Token[Lease | None]) -> None:
    """Undo the `enter_lease` that returned ``token``."""
    _current.reset(token)


@contextmanager
def lease_scope(lease: Lease) -> Iterator[Lease]:
    """Make ``lease`` the `current_lease` for the duration of a task body."""
    token = enter_lease(lease)
    try:
        yield lease
    finally:
        leave_lease(token)
