"""`Limit`: what one bucket allows, as an immutable value.

Public amounts are float tokens and float seconds. Each limit also carries its
integer form (millitokens and milliseconds) which the stores use, so that
fractional amounts such as 0.5 stay exact and nothing drifts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from taskthrottle._exceptions import InvalidInput, InvalidType

Kind = Literal["bucket", "concurrency", "quota"]

#: Integers below this survive a round trip through a Lua number (a double).
MAX_EXACT = 2**53

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)?\s*([a-z]+)\s*\Z")
_CALENDAR_MS = {"hour": 3_600_000, "day": 86_400_000}


def to_milli(value: float, what: str) -> int:
    """Return ``value`` in integer thousandths, refusing what is not exact or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{what} must be a number, got {value!r}"
        raise InvalidType(msg)
    if not math.isfinite(value) or value <= 0:
        msg = f"{what} must be a finite number above zero, got {value!r}"
        raise InvalidInput(msg)
    milli = round(value * 1000)
    if milli < 1 or abs(milli - value * 1000) > 1e-6 * max(1.0, abs(value * 1000)):
        msg = f"{what} must be a multiple of 0.001, got {value!r}"
        raise InvalidInput(msg)
    if milli >= MAX_EXACT:
        msg = f"{what} is too large (at most {MAX_EXACT // 1000 - 1}), got {value!r}"
        raise InvalidInput(msg)
    return milli


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid limit name (letters, digits, ``_ . -``)."""
    if not isinstance(name, str):
        msg = f"a limit name must be a str, got {name!r}"
        raise InvalidType(msg)
    if not _NAME.match(name):
        msg = f"a limit name must be 1-64 of [A-Za-z0-9_.-], got {name!r}"
        raise InvalidInput(msg)
    return name


@dataclass(frozen=True)
class Limit:
    """One named limit: a token bucket, a concurrency limit or a calendar quota.

    Build one with the class methods (`per_minute`, `parse`, `concurrency`,
    `quota`, ...) rather than the constructor.
    """

    name: str
    kind: Kind
    #: Tokens a bucket holds when full, slots of a concurrency limit, or a quota's amount.
    capacity: float
    #: Tokens refilled per ``period`` (buckets only).
    rate: float = 0.0
    #: The refill period in seconds, or the calendar period of a quota.
    period: float = 0.0
    #: The integer form sent to stores: (capacity_mt, refill_mt, period_ms).
    spec: tuple[int, int, int] = field(default=(0, 0, 0), repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lua numbers are doubles: the scripts refuse an entry whose cap + refill * period
        # + amount reaches 2**53 (lua/prelude.lua), and a request charges up to the
        # capacity, so twice the capacity plus refill * period must stay below it.
        cap, refill, period = self.spec
        most = (MAX_EXACT - 1 - refill * period) // 2
        if cap > most:
            what, value = self._capacity_source()
            msg = (
                f"the {what} of limit {self.name!r} is too large for the stores to compute "
                f"exactly (at most {max(0, most) // 1000}), got {value!r}"
            )
            raise InvalidInput(msg)

    def _capacity_source(self) -> tuple[str, float]:
        """What the caller called the capacity, and the value given."""
        if self.kind == "concurrency":
            return "slots", self.capacity
        if self.kind == "quota":
            return "amount", self.capacity
        if self.capacity == self.rate:
            return "rate", self.rate
        return "burst", self.capacity

    @classmethod
    def per_period(
        cls, name: str, rate: float, period: float, *, burst: float | None = None
    ) -> Limit:
        """A token bucket refilling ``rate`` tokens every ``period`` seconds.

        Its capacity is ``burst``, or ``rate`` when no burst is given.
        """
        check_name(name)
        rate_mt = to_milli(rate, f"the rate of limit {name!r}")
        period_ms = to_milli(period, f"the period of limit {name!r}")
        cap_mt = rate_mt if burst is None else to_milli(burst, f"the burst of limit {name!r}")
        gcd = math.gcd(rate_mt, period_ms)
        refill, per = rate_mt // gcd, period_ms // gcd
        if refill * per >= MAX_EXACT:
            msg = f"limit {name!r} is too fine-grained to compute exactly: {rate}/{period}s"
            raise InvalidInput(msg)
        capacity = rate if burst is None else burst
        return cls(name, "bucket", capacity, rate, period, (cap_mt, refill, per))

    @classmethod
    def per_second(cls, name: str, rate: float, *, burst: float | None = None) -> Limit:
        """A token bucket of ``rate`` tokens per second."""
        return cls.per_period(name, rate, 1.0, burst=burst)

    @classmethod
    def per_minute(cls, name: str, rate: float, *, burst: float | None = None) -> Limit:
        """A token bucket of ``rate`` tokens per minute."""
        return cls.per_period(name, rate, 60.0, burst=burst)

    @classmethod
    def per_hour(cls, name: str, rate: float, *, burst: float | None = None) -> Limit:
        """A token bucket of ``rate`` tokens per hour."""
        return cls.per_period(name, rate, 3600.0, burst=burst)

    @classmethod
    def per_day(cls, name: str, rate: float, *, burst: float | None = None) -> Limit:
        """A token bucket of ``rate`` tokens per day (a rolling day, not a calendar one)."""
        return cls.per_period(name, rate, 86400.0, burst=burst)

    @classmethod
    def parse(cls, name: str, text: str, *, burst: float | None = None) -> Limit:
        """A token bucket from text such as ``"100/min"``, ``"5/s"`` or ``"10/500ms"``."""
        if not isinstance(text, str):
            msg = f"a rate must be text such as '100/min', got {text!r}"
            raise InvalidType(msg)
        match = _RATE.match(text.lower())
        if not match or match.group(3) not in _UNITS:
            msg = f"cannot parse rate {text!r}: expected '<amount>/[<n>]<unit>', e.g. '10/500ms'"
            raise InvalidInput(msg)
        amount, count, unit = match.groups()
        period = float(count or 1) * _UNITS[unit]
        return cls.per_period(name, float(amount), period, burst=burst)

    @classmethod
    def concurrency(cls, name: str, slots: float) -> Limit:
        """At most ``slots`` leases in flight at once; a lease takes one slot by default."""
        check_name(name)
        cap_mt = to_milli(slots, f"the slots of limit {name!r}")
        return cls(name, "concurrency", slots, spec=(cap_mt, 0, 0))

    @classmethod
    def quota(cls, name: str, amount: float, *, per: str = "day") -> Limit:
        """A calendar quota of ``amount`` tokens that resets every UTC day (or hour)."""
        check_name(name)
        if per not in _CALENDAR_MS:
            msg = f"a quota resets per 'day' or 'hour', got per={per!r}"
            raise InvalidInput(msg)
        cap_mt = to_milli(amount, f"the amount of limit {name!r}")
        period_ms = _CALENDAR_MS[per]
        return cls(name, "quota", amount, period=period_ms / 1000, spec=(cap_mt, 0, period_ms))

    def __str__(self) -> str:
        if self.kind == "concurrency":
            return f"{self.name}: {self.capacity:g} in flight"
        if self.kind == "quota":
            per = "day" if self.period == 86400 else "hour"
            return f"{self.name}: {self.capacity:g} per UTC {per}"
        return f"{self.name}: {self.rate:g}/{self.period:g}s burst {self.capacity:g}"
