"""Limit: constructors, parsing, and the integer form the stores see."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from taskthrottle import InvalidInput, InvalidType, Limit


class TestConstructors:
    @pytest.mark.parametrize(
        ("limit", "capacity", "spec"),
        [
            (Limit.per_second("a", 5), 5, (5000, 5, 1)),
            (Limit.per_minute("a", 60), 60, (60000, 1, 1)),
            (Limit.per_minute("a", 90_000, burst=120_000), 120_000, (120_000_000, 1500, 1)),
            (Limit.per_hour("a", 1), 1, (1000, 1, 3600)),
            (Limit.per_day("a", 1_000_000), 1_000_000, (1_000_000_000, 625, 54)),
            (Limit.per_second("a", 0.5), 0.5, (500, 1, 2)),
        ],
    )
    def test_integer_form(self, limit: Limit, capacity: float, spec: tuple[int, int, int]) -> None:
        """Capacity defaults to the rate; refill/period is reduced to lowest terms."""
        assert limit.capacity == capacity
        assert limit.spec == spec

    def test_concurrency_and_quota(self) -> None:
        """Concurrency limits count slots; quotas carry their calendar period."""
        assert Limit.concurrency("c", 3).spec == (3000, 0, 0)
        assert Limit.quota("q", 1_000_000).spec == (1_000_000_000, 0, 86_400_000)
        assert Limit.quota("q", 10, per="hour").spec == (10_000, 0, 3_600_000)

    def test_str_describes_the_limit(self) -> None:
        """str() reads as the limit's meaning."""
        assert str(Limit.per_minute("rpm", 60)) == "rpm: 60/60s burst 60"
        assert str(Limit.concurrency("c", 2)) == "c: 2 in flight"
        assert str(Limit.quota("d", 5)) == "d: 5 per UTC day"

    def test_equal_limits_compare_equal(self) -> None:
        """Limits are values: the same definition is the same limit."""
        assert Limit.parse("rpm", "60/min") == Limit.per_minute("rpm", 60)
        assert Limit.per_minute("rpm", 60) != Limit.per_minute("rpm", 61)


class TestParse:
    @pytest.mark.parametrize(
        ("text", "rate", "period"),
        [
            ("100/min", 100, 60),
            ("100/minute", 100, 60),
            ("5/s", 5, 1),
            ("5 / second", 5, 1),
            ("10/500ms", 10, 0.5),
            ("1000/hour", 1000, 3600),
            ("2/3h", 2, 10800),
            ("7/day", 7, 86400),
            ("0.5/s", 0.5, 1),
            ("10/1.5s", 10, 1.5),
            ("10/MIN", 10, 60),
        ],
    )
    def test_accepted(self, text: str, rate: float, period: float) -> None:
        """Amount, an optional count, and a unit."""
        limit = Limit.parse("x", text)
        assert (limit.rate, limit.period) == (rate, period)

    @pytest.mark.parametrize("text", ["", "100", "100/", "/min", "100/fortnight", "-1/s", "a/s"])
    def test_refused_with_the_text_in_the_message(self, text: str) -> None:
        """Unparseable rates name the text."""
        with pytest.raises(InvalidInput, match="cannot parse rate"):
            Limit.parse("x", text)

    def test_burst(self) -> None:
        """parse takes a burst like the other constructors."""
        assert Limit.parse("x", "10/s", burst=30).capacity == 30


class TestBadInput:
    @pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf, -math.inf, 1e-4, 2**60])
    def test_bad_rates(self, rate: float) -> None:
        """Zero, negative, NaN, infinite, too fine or too large rates are refused by value."""
        with pytest.raises(InvalidInput, match=re_value(rate)):
            Limit.per_second("x", rate)

    @pytest.mark.parametrize("burst", [0, -5, math.nan, math.inf])
    def test_bad_bursts(self, burst: float) -> None:
        """A bad burst is named in the error."""
        with pytest.raises(InvalidInput, match="burst"):
            Limit.per_second("x", 5, burst=burst)

    @pytest.mark.parametrize("value", ["5", None, True, [1]])
    def test_non_numbers(self, value: object) -> None:
        """A rate that is not a number is a TypeError."""
        with pytest.raises(InvalidType, match="must be a number"):
            Limit.per_second("x", value)  # type: ignore[arg-type]

    @pytest.mark.parametrize("name", ["", "a:b", "a b", "x" * 65, "tpm{", "é"])
    def test_bad_names(self, name: str) -> None:
        """Names are 1-64 of [A-Za-z0-9_.-]: the error quotes the name."""
        with pytest.raises(InvalidInput, match="limit name"):
            Limit.per_second(name, 1)

    def test_name_must_be_text(self) -> None:
        """A non-text name is a TypeError."""
        with pytest.raises(InvalidType):
            Limit.concurrency(3, 1)  # type: ignore[arg-type]

    def test_bad_quota_period(self) -> None:
        """Quotas reset per day or hour only."""
        with pytest.raises(InvalidInput, match="'week'"):
            Limit.quota("q", 5, per="week")

    @pytest.mark.parametrize(
        ("make", "what", "value"),
        [
            (lambda: Limit.per_second("x", 5, burst=4.6e12), "burst", 4.6e12),
            (lambda: Limit.per_second("x", 4.6e12), "rate", 4.6e12),
            (lambda: Limit.per_period("x", 89_999.999, 86_400.001, burst=1e12), "burst", 1e12),
            (lambda: Limit.concurrency("c", 4.6e12), "slots", 4.6e12),
            (lambda: Limit.quota("q", 4.6e12), "amount", 4.6e12),
        ],
        ids=["burst", "rate", "burst-with-refill", "slots", "amount"],
    )
    def test_what_would_pass_2_53_in_lua_is_refused(
        self, make: Callable[[], Limit], what: str, value: float
    ) -> None:
        """Each value below 2**53 thousandths by itself, but not the sums the stores check
        (capacity + refill x period + an amount up to the capacity): refused by value."""
        with pytest.raises(InvalidInput, match=rf"the {what} of limit .* got {re_value(value)}$"):
            make()

    @pytest.mark.parametrize(
        "limit",
        [
            Limit.per_second("x", 5, burst=4_503_599_627_370),
            Limit.per_period("x", 89_999.999, 86_400.001, burst=615_599_625_570),
            Limit.concurrency("c", 4_503_599_627_370),
            Limit.quota("q", 4_503_599_627_370),
        ],
    )
    def test_the_largest_limits_stay_exact(self, limit: Limit) -> None:
        """Right at the bound a limit is made, and the sums Lua checks stay below 2**53."""
        cap, refill, period = limit.spec
        assert cap + refill * period + cap < 2**53

    def test_too_fine_grained(self) -> None:
        """A rate whose exact arithmetic would pass 2**53 is refused."""
        with pytest.raises(InvalidInput, match="fine-grained"):
            Limit.per_period("x", 1_000_000_000.001, 86_399.999)


def re_value(value: float) -> str:
    import re

    return re.escape(repr(value))
