"""Limiter: bad input is refused with an error naming it, and changes nothing."""

from __future__ import annotations

import math
from typing import Any

import pytest

from taskthrottle import InvalidInput, InvalidType, Limit, Limiter, MemoryStore

rpm = Limit.per_minute("rpm", 60)
tpm = Limit.per_minute("tpm", 1000)
conc = Limit.concurrency("conc", 2)
FULL = {"rpm": 60.0, "tpm": 1000.0, "conc": 2.0}


def unchanged(limiter: Limiter) -> None:
    assert limiter.available("k", [rpm, tpm, conc]) == FULL


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            ("k", [rpm]),
            {"consume": {"rpx": 1}},
            InvalidInput,
            "not have: 'rpx' \\(its limits: rpm\\)",
        ),
        (("k", [rpm, tpm]), {"consume": {"tpm": 0}}, InvalidInput, "consume\\['tpm'\\].* 0"),
        (("k", [rpm, tpm]), {"consume": {"tpm": -5}}, InvalidInput, "-5"),
        (("k", [rpm, tpm]), {"consume": {"tpm": math.nan}}, InvalidInput, "nan"),
        (("k", [rpm, tpm]), {"consume": {"tpm": math.inf}}, InvalidInput, "inf"),
        (("k", [rpm, tpm]), {"consume": {"tpm": 2.0**60}}, InvalidInput, "too large"),
        (("k", [rpm, tpm]), {"consume": {"tpm": 0.0001}}, InvalidInput, "0.001"),
        (("k", [rpm, tpm]), {"consume": {"tpm": "5"}}, InvalidType, "'5'"),
        (("k", [rpm, tpm]), {"consume": [("tpm", 5)]}, InvalidType, "consume must map"),
        (("k", [rpm, Limit.per_hour("rpm", 5)]), {}, InvalidInput, "two limits named 'rpm'"),
        ((42, [rpm]), {}, InvalidType, "42"),
        ((b"k", [rpm]), {}, InvalidType, "b'k'"),
        (({"k": [rpm], 7: [tpm]}, None), {}, InvalidType, "7"),
        (("", [rpm]), {}, InvalidInput, "1 to 4096"),
        (("k", []), {}, InvalidInput, "no limits given for key 'k'"),
        (("k", None), {}, InvalidInput, "no limits given for key 'k'"),
        (("k", rpm), {}, InvalidType, "must be a list of Limit"),
        (("k", ["60/min"]), {}, InvalidType, "must be Limit objects"),
        (({"k": [rpm]}, [tpm]), {}, InvalidInput, "not both"),
        (({},), {}, InvalidInput, "no keys given"),
        (("k", [rpm]), {"ttl": 0}, InvalidInput, "ttl .* 0"),
        (("k", [rpm]), {"ttl": math.nan}, InvalidInput, "nan"),
        (("k", [rpm]), {"lease_id": 5}, InvalidType, "5"),
    ],
)
def test_bad_acquire(
    limiter: Limiter, args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    """Each bad argument raises its own error naming the value; nothing is charged."""
    with pytest.raises(error, match=match):
        limiter.acquire(*args, **kwargs)
    with pytest.raises(error, match=match):
        limiter.reserve(*args, **kwargs)
    unchanged(limiter)


@pytest.mark.parametrize(
    ("max_wait", "error"),
    [(-1, InvalidInput), (math.nan, InvalidInput), (math.inf, InvalidInput), ("5", InvalidType)],
)
def test_bad_max_wait(limiter: Limiter, max_wait: Any, error: type) -> None:
    """max_wait must be a finite number of seconds."""
    with pytest.raises(error, match="max_wait"):
        limiter.reserve("k", [rpm], max_wait=max_wait)
    unchanged(limiter)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"rpx": 1}, InvalidInput, "'rpx', which this lease does not hold"),
        ({"tpm": math.nan}, InvalidInput, "nan"),
        ({"tpm": -math.inf}, InvalidInput, "-inf"),
        ({"tpm": "3"}, InvalidType, "'3'"),
        ({"conc": 1}, InvalidInput, "cannot adjust concurrency limit 'conc'"),
        ({"tpm": -11}, InvalidInput, "refund more than this lease consumed \\(10\\)"),
        ({"tpm": 5, "rpx": 1}, InvalidInput, "rpx"),
    ],
)
def test_bad_adjust(limiter: Limiter, changes: dict[str, Any], error: type, match: str) -> None:
    """A bad adjustment raises naming the value and applies none of its changes."""
    lease = limiter.acquire("k", [rpm, tpm, conc], consume={"tpm": 10})
    with pytest.raises(error, match=match):
        lease.adjust(**changes)
    assert limiter.available("k", [rpm, tpm]) == {"rpm": 59.0, "tpm": 990.0}
    assert lease.consumed == {"rpm": 1.0, "tpm": 10.0}


def test_zero_adjustment_is_a_no_op(limiter: Limiter) -> None:
    """adjust(tpm=0), as in `actual - estimate` when the estimate was right, changes nothing."""
    lease = limiter.acquire("k", [tpm], consume={"tpm": 10})
    lease.adjust(tpm=0)
    assert limiter.available("k", [tpm]) == {"tpm": 990.0}


@pytest.mark.parametrize(
    ("ttl", "error"),
    [(0, InvalidInput), (-1, InvalidInput), (math.nan, InvalidInput), ("300", InvalidType)],
)
def test_bad_lease_ttl(ttl: Any, error: type) -> None:
    """A limiter refuses a lease TTL that is not a finite positive duration."""
    with pytest.raises(error, match="lease_ttl"):
        Limiter(MemoryStore(), lease_ttl=ttl)


def test_reset_refuses_non_text(limiter: Limiter) -> None:
    """reset takes a key, nothing else."""
    with pytest.raises(InvalidType):
        limiter.reset(None)  # type: ignore[arg-type]


def test_cancel_after_redeem_is_refused(limiter: Limiter) -> None:
    """A redeemed reservation is a lease: cancelling it would refund spent tokens."""
    booked = limiter.reserve("k", [rpm])
    booked.redeem()
    with pytest.raises(InvalidInput, match="redeemed"):
        booked.cancel()
    assert limiter.available("k", [rpm]) == {"rpm": 59.0}


def test_redeem_after_cancel_is_refused(limiter: Limiter) -> None:
    """A cancelled reservation has nothing left to redeem."""
    booked = limiter.reserve("k", [rpm])
    booked.cancel()
    with pytest.raises(InvalidInput, match="cancelled"):
        booked.redeem()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: Limiter(lease_ttl=1e9), "lease_ttl must be at most 86400"),
        (lambda: Limiter().acquire("k", [conc], ttl=86_401), "ttl must be at most 86400"),
        (lambda: Limiter().reserve("k", [rpm], max_wait=1e6), "max_wait must be at most"),
    ],
)
def test_durations_are_bounded(call: Any, match: str) -> None:
    """A slot held for 31 years, or a turn booked a year ahead, is refused by name."""
    with pytest.raises(InvalidInput, match=match):
        call()
