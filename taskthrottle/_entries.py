"""A request as store entries: the model the limiter and the stores speak (`Entry`, its kinds),
and the checks that turn a caller's request into entries before anything changes."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from taskthrottle._exceptions import InvalidInput, InvalidType, RequestTooLarge
from taskthrottle._limits import MAX_EXACT, Limit

#: Entry kinds, as sent to a store. A fixed window and a calendar quota are one kind.
BUCKET, CONCURRENCY, QUOTA, SLIDING = 0, 1, 2, 3
FIXED = QUOTA


class Entry(NamedTuple):
    """One limit under one key, and the millitokens an operation charges it.

    ``cap`` is the capacity in millitokens; a bucket refills ``refill``
    millitokens every ``period`` milliseconds; a fixed window (a quota) counts
    per ``period`` milliseconds since the epoch, and a sliding window over the last
    ``period`` (its ``refill`` is its ``cap``, see `Limit.per_period`).
    """

    key: str
    name: str
    kind: int
    cap: int
    refill: int
    period: int
    amount: int


KeyLimits = Mapping[str, Sequence[Limit]]
Target = str | KeyLimits
Consume = Mapping[str, float]

_KINDS = {
    "bucket": BUCKET,
    "concurrency": CONCURRENCY,
    "quota": FIXED,
    "fixed_window": FIXED,
    "sliding_window": SLIDING,
}
#: Longest key accepted, in characters; longer keys are almost always a bug.
MAX_KEY_LENGTH = 4096


class _Ids:
    """Lease ids unique across processes: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


new_id = _Ids().next


_new = tuple.__new__  # a NamedTuple without its Python-level __new__
#: Whole token amounts below this are exact in millitokens (checked once, here).
_WHOLE = MAX_EXACT // 1000


def milli_amount(value: object, what: str, name: str, *, signed: bool = False) -> int:
    """``value`` in millitokens (rounded to 0.001); only ``signed`` amounts may be zero or
    negative. ``what`` formatted with ``name`` labels the value in errors."""
    kind = type(value)
    if (kind is float and math.isfinite(value)) or (kind is int and abs(value) < MAX_EXACT):  # type: ignore[arg-type]
        milli = round(value * 1000)  # type: ignore[operator]
        if (milli > 0 or signed) and abs(milli) < MAX_EXACT:
            return milli
    label = what.format(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{label} must be a number, got {value!r}"
        raise InvalidType(msg)
    if (isinstance(value, float) and not math.isfinite(value)) or (value <= 0 and not signed):
        rule = "a finite number" if signed else "a finite number above zero"
        msg = f"{label} must be {rule}, got {value!r}"
        raise InvalidInput(msg)
    if abs(value) * 1000 >= MAX_EXACT:
        msg = f"{label} is too large, got {value!r}"
        raise InvalidInput(msg)
    msg = f"{label} must be at least 0.001, got {value!r}"
    raise InvalidInput(msg)


def check_key(key: object) -> str:
    """Return ``key`` if it is usable as a limiter key (any non-empty text)."""
    if not isinstance(key, str):
        msg = f"a key must be a str, got {key!r}"
        raise InvalidType(msg)
    if not key or len(key) > MAX_KEY_LENGTH:
        msg = f"a key must have 1 to {MAX_KEY_LENGTH} characters, got {key[:80]!r}"
        raise InvalidInput(msg)
    return key


def groups(target: object, limits: object) -> list[tuple[str, Sequence[Limit]]]:
    """The ``(key, limits)`` pairs of a request, checked."""
    if isinstance(target, str):
        if limits is None:
            msg = f"no limits given for key {target!r}"
            raise InvalidInput(msg)
        pairs = [(target, limits)]
    elif isinstance(target, Mapping):
        if limits is not None:
            msg = "give limits either in the mapping or as the second argument, not both"
            raise InvalidInput(msg)
        pairs = list(target.items())
    else:
        msg = f"a key must be a str or a mapping of keys to limits, got {target!r}"
        raise InvalidType(msg)
    if not pairs:
        raise InvalidInput("no keys given")
    return [(check_key(key), check_limits(key, lims)) for key, lims in pairs]


def check_limits(key: str, limits: object) -> Sequence[Limit]:
    """Return ``limits`` if it is a non-empty sequence of distinctly named `Limit`s."""
    if isinstance(limits, (str, Limit)) or not isinstance(limits, Sequence):
        msg = f"limits for key {key!r} must be a list of Limit, got {limits!r}"
        raise InvalidType(msg)
    if not limits:
        msg = f"no limits given for key {key!r}"
        raise InvalidInput(msg)
    names: set[str] = set()
    for limit in limits:
        if not isinstance(limit, Limit):
            msg = f"limits for key {key!r} must be Limit objects, got {limit!r}"
            raise InvalidType(msg)
        if limit.name in names:
            msg = f"two limits named {limit.name!r} under key {key!r}"
            raise InvalidInput(msg)
        names.add(limit.name)
    return limits


#: Validated requests by (key, *limits): most callers repeat a handful of shapes.
_shapes: dict[tuple[object, ...], tuple[list[Entry], Names, tuple[Limit, ...]]] = {}
MAX_SHAPES = 4096


class Shape(list[Entry]):
    """The entries of a cached request shape: the same list object on every call, which lets
    a store cache its encoding; only `shape` makes them, for what it caches. Never mutated.
    """


class Names(frozenset[str]):
    """The limit names of a request; ``fits`` when one token of each fits its capacity."""

    fits = False


def shape(target: object, limits: object) -> tuple[list[Entry], Names]:
    """The entries of a request charging one token each, and its limit names; cached for
    the common single-key form, since validating the same limits again is wasted work."""
    cacheable = isinstance(target, str) and isinstance(limits, (list, tuple))
    if cacheable:
        # Keyed by the limits' ids: cheap to hash, and unambiguous because the cached
        # entry holds the limits themselves, so no id can be reused while it is cached.
        cache_key = (target, *map(id, limits))  # type: ignore[call-overload]
        hit = _shapes.get(cache_key)
        if hit is not None:
            return hit[0], hit[1]
    pairs = groups(target, limits)
    base = [
        Entry(key, lim.name, _KINDS[lim.kind], *lim.spec, 1000)
        for key, lims in pairs
        for lim in lims
    ]
    names = Names(e.name for e in base)
    names.fits = all(e.amount <= e.cap for e in base)
    if not cacheable:
        return base, names  # a plain list: stores must not cache what lives once
    cached = Shape(base)
    if len(_shapes) >= MAX_SHAPES:
        _shapes.clear()
    _shapes[cache_key] = (cached, names, tuple(limits))  # type: ignore[arg-type]
    return cached, names


def entries(
    target: object, limits: object, consume: Consume | None, *, default: int = 1000
) -> list[Entry]:
    """The store entries a request charges: each named limit ``consume[name]``, others
    ``default`` millitokens (one token). Most calls give ``consume`` (an LLM task's
    tokens): that path converts each amount once and builds the entries directly."""
    base, names = shape(target, limits)
    if not consume:
        if default == 1000 and names.fits:
            return base
        amounts: Mapping[str, object] = {}
    elif type(consume) is dict and names.issuperset(consume):
        amounts = consume  # converted below, as each entry takes its amount
    else:
        amounts = check_consume(consume, names)
    charged = []
    for key, name, kind, cap, refill, period, _ in base:
        value = amounts.get(name)
        if value is None:
            amount = default
        elif type(value) is int and 0 < value < _WHOLE:
            amount = value * 1000
        else:
            amount = milli_amount(value, "consume[{!r}]", name)
        if amount > cap:
            msg = (
                f"consume {amount / 1000:g} of {name!r} under key {key!r} exceeds "
                f"its capacity {cap / 1000:g}: it could never pass"
            )
            raise RequestTooLarge(msg)
        charged.append(_new(Entry, (key, name, kind, cap, refill, period, amount)))
    return charged


def check_consume(consume: object, names: frozenset[str]) -> dict[str, int]:
    """``consume`` in millitokens, every name known to the request."""
    if consume is None:
        return {}
    if not isinstance(consume, Mapping):
        msg = f"consume must map limit names to amounts, got {consume!r}"
        raise InvalidType(msg)
    if not names.issuperset(consume):
        unknown = sorted(set(consume) - names, key=str)
        which = "a limit" if len(unknown) == 1 else "limits"
        msg = (
            f"consume names {which} this request does not have: "
            f"{', '.join(map(repr, unknown))} (its limits: {', '.join(sorted(names))})"
        )
        raise InvalidInput(msg)
    return {name: milli_amount(value, "consume[{!r}]", name) for name, value in consume.items()}
