"""`Limit`: what one bucket allows, as an immutable value.

Public amounts are float tokens and float seconds. Each limit also carries its
integer form (millitokens and milliseconds) which the stores use, so that
fractional amounts such as 0.5 stay exact and nothing drifts.

A rate limit counts by one of three strategies (see docs/strategies.md): a token bucket
(the default), a fixed window or a sliding window; windows are aligned to the epoch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from taskthrottle._exceptions import InvalidInput, InvalidType

Kind = Literal["bucket", "concurrency", "quota", "fixed_window", "sliding_window"]
Strategy = Literal["token_bucket", "fixed_window", "sliding_window"]
#: The strategies a rate limit may count by, and the kind of limit each makes.
STRATEGIES: dict[str, Kind] = {
    "token_bucket": "bucket",
    "fixed_window": "fixed_window",
    "sliding_window": "sliding_window",
}

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
DAY_MS = 86_400_000


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


def check_strategy(strategy: object, what: str) -> Kind:
    """The kind of limit ``strategy`` makes, refusing a name that is not a strategy;
    ``what`` is what the error names (``"limit 'rpm'"``)."""
    kind = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    if kind is None:
        choices = ", ".join(map(repr, STRATEGIES))
        msg = f"{what}: strategy must be one of {choices}, got {strategy!r}"
        raise (InvalidInput if isinstance(strategy, str) else InvalidType)(msg)
    return kind


def check_window_period(name: str, strategy: str, period_ms: int, period: float) -> None:
    """Refuse a window whose period does not align with UTC days: windows start at
    multiples of the period since the epoch, so a period must divide a day evenly (then
    every day starts a window) or be whole days."""
    if DAY_MS % period_ms and period_ms % DAY_MS:
        msg = (
            f"the period of {strategy} limit {name!r} must divide a day evenly (such as 1 s, "
            f"1.5 s, 10 s, 1 min, 15 min, 1 h) or be whole days, so that every window starts "
            f"at the same instant in every process and in Redis; got {period!r}"
        )
        raise InvalidInput(msg)


@dataclass(frozen=True)
class Limit:
    """One named limit: a rate limit (a token bucket, a fixed window or a sliding window),
    a concurrency limit or a calendar quota (a fixed window of a UTC day or hour).

    Build one with the class methods (`per_minute`, `parse`, `concurrency`,
    `quota`, ...) rather than the constructor.
    """

    name: str
    kind: Kind
    #: Tokens a bucket holds when full, slots of a concurrency limit, or what a window
    #: (or quota) allows.
    capacity: float
    #: Tokens refilled per ``period`` (a bucket), or allowed per window.
    rate: float = 0.0
    #: The refill period in seconds, or the length of a window (a quota's calendar period).
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

    @property
    def strategy(self) -> Strategy | None:
        """How a rate limit counts: "token_bucket", "fixed_window" (a quota too) or
        "sliding_window"; None for a concurrency limit."""
        if self.kind == "concurrency":
            return None
        if self.kind == "quota":
            return "fixed_window"
        return "token_bucket" if self.kind == "bucket" else self.kind

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
        cls,
        name: str,
        rate: float,
        period: float,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """``rate`` tokens every ``period`` seconds, counted by ``strategy``.

        A token bucket (the default) refills continuously; its capacity is ``burst``, or
        ``rate`` when no burst is given. A "fixed_window" allows ``rate`` per window,
        windows starting at multiples of ``period`` since the epoch; a "sliding_window"
        allows ``rate`` over the last ``period``, estimated from two windows (see
        docs/strategies.md). Windows take no burst.
        """
        check_name(name)
        kind = check_strategy(strategy, f"limit {name!r}")
        if kind != "bucket":
            return cls._window(name, kind, rate, period, burst)
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
    def _window(
        cls, name: str, kind: Kind, rate: float, period: float, burst: float | None
    ) -> Limit:
        """A fixed or sliding window of ``rate`` per ``period``, checked."""
        if burst is not None:
            msg = (
                f"limit {name!r}: a {kind} takes no burst (it allows its rate per window; "
                f"strategy='token_bucket' takes one), got burst={burst!r}"
            )
            raise InvalidInput(msg)
        cap_mt = to_milli(rate, f"the rate of limit {name!r}")
        period_ms = to_milli(period, f"the period of limit {name!r}")
        check_window_period(name, kind, period_ms, period)
        if kind == "fixed_window":
            return cls(name, kind, rate, rate, period, (cap_mt, 0, period_ms))
        # A sliding window weighs the last window's count by the time left of it: the
        # stores multiply the two, which must stay exact (below 2**53 with an amount).
        most = (MAX_EXACT - 1) // (period_ms + 2)
        if cap_mt > most:
            msg = (
                f"the rate of sliding_window limit {name!r} is too large for the stores to "
                f"weigh exactly over {period!r} s (at most {most // 1000}; a fixed_window or "
                f"a token bucket has no such bound), got {rate!r}"
            )
            raise InvalidInput(msg)
        # The refill of a sliding window is its cap: what a window's count drops by when
        # the next window starts; it makes the sums the stores check cover the weighing.
        return cls(name, kind, rate, rate, period, (cap_mt, cap_mt, period_ms))

    @classmethod
    def per_second(
        cls,
        name: str,
        rate: float,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """``rate`` tokens per second: a token bucket, or the window ``strategy`` names."""
        return cls.per_period(name, rate, 1.0, burst=burst, strategy=strategy)

    @classmethod
    def per_minute(
        cls,
        name: str,
        rate: float,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """``rate`` tokens per minute: a token bucket, or the window ``strategy`` names."""
        return cls.per_period(name, rate, 60.0, burst=burst, strategy=strategy)

    @classmethod
    def per_hour(
        cls,
        name: str,
        rate: float,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """``rate`` tokens per hour: a token bucket, or the window ``strategy`` names."""
        return cls.per_period(name, rate, 3600.0, burst=burst, strategy=strategy)

    @classmethod
    def per_day(
        cls,
        name: str,
        rate: float,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """``rate`` tokens per day: a token bucket (a rolling day), or the window
        ``strategy`` names (a "fixed_window" is the UTC day, as `quota`)."""
        return cls.per_period(name, rate, 86400.0, burst=burst, strategy=strategy)

    @classmethod
    def parse(
        cls,
        name: str,
        text: str,
        *,
        burst: float | None = None,
        strategy: Strategy = "token_bucket",
    ) -> Limit:
        """A limit from text such as ``"100/min"``, ``"5/s"`` or ``"10/500ms"``: a token
        bucket, or the window ``strategy`` names."""
        if not isinstance(text, str):
            msg = f"a rate must be text such as '100/min', got {text!r}"
            raise InvalidType(msg)
        match = _RATE.match(text.lower())
        if not match or match.group(3) not in _UNITS:
            msg = f"cannot parse rate {text!r}: expected '<amount>/[<n>]<unit>', e.g. '10/500ms'"
            raise InvalidInput(msg)
        amount, count, unit = match.groups()
        period = float(count or 1) * _UNITS[unit]
        return cls.per_period(name, float(amount), period, burst=burst, strategy=strategy)

    @classmethod
    def concurrency(cls, name: str, slots: float) -> Limit:
        """At most ``slots`` leases in flight at once; a lease takes one slot by default."""
        check_name(name)
        cap_mt = to_milli(slots, f"the slots of limit {name!r}")
        return cls(name, "concurrency", slots, spec=(cap_mt, 0, 0))

    @classmethod
    def quota(cls, name: str, amount: float, *, per: str = "day") -> Limit:
        """A calendar quota of ``amount`` tokens that resets every UTC day (or hour): a fixed
        window of that period, as ``per_day(..., strategy="fixed_window")`` makes."""
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
        if self.kind != "bucket":
            return f"{self.name}: {self.rate:g}/{self.period:g}s {self.kind.replace('_', ' ')}"
        return f"{self.name}: {self.rate:g}/{self.period:g}s burst {self.capacity:g}"
