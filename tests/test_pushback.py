"""Upstream pushback over every store, the headers it is read from, and the tenacity
policies that honour refusals and Retry-After."""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any

import pytest
import tenacity

from taskthrottle import (
    BreakerOpen,
    InvalidInput,
    InvalidType,
    Limit,
    Limiter,
    RedisStore,
    Throttled,
    _limiter,
)
from taskthrottle._store import Store
from taskthrottle.headers import duration, read_headers
from taskthrottle.tenacity import (
    retry_after_of,
    retry_refused_or,
    stop_after_failures,
    wait_retry_after,
)
from taskthrottle.testing import ManualClock

rpm = Limit.per_minute("rpm", 60)
tpm = Limit.per_minute("tpm", 90_000)
rpd = Limit.quota("rpd", 1000)


def refused(limiter: Limiter, *args: Any, **kwargs: Any) -> Throttled:
    with pytest.raises(Throttled) as info:
        limiter.acquire(*args, **kwargs)
    return info.value


class TestPushback:
    def test_holds_every_limit_of_the_key_until_then(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """Whatever limits a request acquires on the key (alone or with another key), it
        waits out the hold; other keys do not."""
        limiter.pushback("openai", retry_after=12.5)
        assert refused(limiter, "openai", [rpm]).retry_after == 12.5
        assert refused(limiter, "openai", [tpm, rpd]).retry_after == 12.5
        exc = refused(limiter, {"openai": [rpm], "tenant:1": [rpm]})
        assert {v.key for v in exc.violations} == {"openai"}
        limiter.acquire("other", [rpm])
        clock.advance(12.5)
        limiter.acquire("openai", [rpm, tpm])

    def test_holds_a_request_of_slots_alone(self, limiter: Limiter, clock: ManualClock) -> None:
        """A request of concurrency slots only waits out the hold too; its slots stay free,
        and it takes them once the hold has passed."""
        slots = Limit.concurrency("calls", 2)
        limiter.pushback("bridge", retry_after=3.0)
        assert refused(limiter, "bridge", [slots]).retry_after == 3.0
        assert limiter.available("bridge", [slots]) == {"calls": 2.0}
        clock.advance(3.0)
        limiter.acquire("bridge", [slots]).release()
        limiter.acquire("other", [slots]).release()

    def test_a_later_hold_wins(self, limiter: Limiter, clock: ManualClock) -> None:
        """A shorter hold does not cut a longer one short; a longer one extends it."""
        limiter.pushback("k", retry_after=10)
        limiter.pushback("k", retry_after=2)
        assert refused(limiter, "k", [rpm]).retry_after == 10
        limiter.pushback("k", retry_after=30)
        assert refused(limiter, "k", [rpm]).retry_after == 30

    def test_remaining_lowers_but_never_raises(self, limiter: Limiter) -> None:
        """What the callee says is left becomes what is available, if that is less."""
        for _ in range(10):
            limiter.acquire("k", [rpm, rpd])
        limiter.pushback("k", remaining={"rpm": 3, "rpd": 500}, limits=[rpm, rpd])
        assert limiter.available("k", [rpm, rpd]) == {"rpm": 3.0, "rpd": 500.0}
        limiter.pushback("k", remaining={"rpm": 40}, limits=[rpm])
        assert limiter.available("k", [rpm]) == {"rpm": 3.0}
        for _ in range(3):
            limiter.acquire("k", [rpm])
        assert refused(limiter, "k", [rpm]).retry_after == 1.0  # no hold: the bucket's own

    def test_a_reservation_books_its_turn_past_the_hold(
        self, limiter: Limiter, clock: ManualClock
    ) -> None:
        """reserve() within its max_wait books the turn at the end of the hold."""
        limiter.pushback("k", retry_after=5)
        assert limiter.reserve("k", [rpm], max_wait=10).delay == 5.0
        with pytest.raises(Throttled):
            limiter.reserve("k", [rpm], max_wait=4)

    def test_the_key_expires(self, limiter: Limiter, store: Store) -> None:
        """The hold lives in the key's hash, which carries a TTL past the hold."""
        if not isinstance(store, RedisStore):
            pytest.skip("a Redis key's TTL")
        limiter.pushback("k", retry_after=300)
        ttl = store.client.pttl(store._codec.key_names("k")[0])
        assert 300_000 < ttl <= 360_000

    @pytest.mark.parametrize(
        ("kwargs", "named"),
        [
            ({"retry_after": -1}, "retry_after"),
            ({"remaining": {"rpm": 1}}, "needs the limits"),
            ({"remaining": {"nope": 1}, "limits": [rpm]}, "'nope'"),
            ({"remaining": {"slots": 1}, "limits": [Limit.concurrency("slots", 2)]}, "'slots'"),
            ({"remaining": {"rpm": -3}, "limits": [rpm]}, "at least 0, got -3"),
        ],
    )
    def test_bad_input_is_refused(self, kwargs: dict[str, Any], named: str) -> None:
        """A pushback with bad values changes nothing and names the value."""
        with pytest.raises(InvalidInput, match=named):
            Limiter().pushback("k", **kwargs)

    def test_a_hold_past_a_day_is_held_for_a_day(
        self,
        limiter: Limiter,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A server's Retry-After of two days, straight from the headers, holds the key
        for a day (the longest hold) instead of raising in the caller's 429 handling;
        logged once. What is not a duration at all is still refused."""
        monkeypatch.setattr(_limiter, "_capped_holds", [])
        hint = read_headers({"Retry-After": str(2 * 86_400)})
        with caplog.at_level(logging.WARNING, logger="taskthrottle"):
            limiter.pushback("k", hint.retry_after)
            limiter.pushback("k", 3 * 86_400.0)
        assert refused(limiter, "k", [rpm]).retry_after == 86_400.0
        assert [r.getMessage() for r in caplog.records if "pushback" in r.getMessage()] == [
            "taskthrottle: a pushback of 172800 s is held for 86400 s, the longest (said once)"
        ]
        for bad in (float("inf"), float("nan"), -0.5):
            with pytest.raises(InvalidInput, match="retry_after"):
                limiter.pushback("k", bad)
        with pytest.raises(InvalidType, match="retry_after"):
            limiter.pushback("k", "172800")  # type: ignore[arg-type]


class TestHeaders:
    def test_llm_api_headers(self) -> None:
        """x-ratelimit-* pairs, with durations as OpenAI writes them; an exhausted
        resource's reset is the hold when there is no Retry-After."""
        hint = read_headers(
            {
                "X-RateLimit-Remaining-Requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-tokens": "1200",
                "x-ratelimit-reset-tokens": "20ms",
            }
        )
        assert hint.remaining == {"requests": 0.0, "tokens": 1200.0}
        assert hint.reset == {"requests": 360.0, "tokens": 0.02}
        assert hint.retry_after == 360.0

    def test_retry_after_forms(self) -> None:
        """Seconds, milliseconds (preferred) and an HTTP date."""
        assert read_headers({"Retry-After": "7"}).retry_after == 7.0
        assert read_headers([("retry-after", "7"), ("retry-after-ms", "1500")]).retry_after == 1.5
        date = email.utils.formatdate(time.time() + 30, usegmt=True)
        assert 28 <= (read_headers({"retry-after": date}).retry_after or 0) <= 30
        assert read_headers({"retry-after": "soon"}).retry_after is None

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("1.5", 1.5), ("20ms", 0.02), ("1h2m3s", 3723.0), ("x", None), ("-1", None)],
    )
    def test_durations(self, text: str, seconds: float | None) -> None:
        """Durations read as LLM APIs write them; anything else is None."""
        assert duration(text) == seconds


class Response:
    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code, self.headers = status_code, headers


class HTTPError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class TestTenacity:
    def test_wait_honours_refusals_and_retry_after(self) -> None:
        """A refusal's retry_after, then a 429's Retry-After, else the fallback."""
        waits: list[float] = []
        errors: list[BaseException] = [
            BreakerOpen("openai", 2.5, "open"),
            HTTPError(Response(429, {"retry-after": "4"})),
            HTTPError(Response(500, {"retry-after": "4"})),
        ]

        @tenacity.retry(
            wait=wait_retry_after(fallback=tenacity.wait_fixed(0.25)),
            retry=retry_refused_or(HTTPError),
            sleep=waits.append,
        )
        def flaky() -> str:
            if errors:
                raise errors.pop(0)
            return "done"

        assert flaky() == "done"
        assert waits == [2.5, 4.0, 0.25]

    def test_refusals_do_not_count_towards_stop(self) -> None:
        """stop_after_failures(2) stops at the second real failure, however many
        refusals came between."""
        outcomes: list[BaseException] = [
            ConnectionError(),
            BreakerOpen("openai", 0, "open"),
            BreakerOpen("openai", 0, "half-open"),
            Throttled(0.0, ()),
            ConnectionError("second"),
            ConnectionError("never reached"),
        ]

        @tenacity.retry(
            wait=tenacity.wait_none(),
            retry=retry_refused_or(ConnectionError),
            stop=stop_after_failures(2),
            reraise=True,
        )
        def call() -> None:
            raise outcomes.pop(0)

        with pytest.raises(ConnectionError, match="second"):
            call()
        assert len(outcomes) == 1

    def test_retry_after_of_other_errors(self) -> None:
        """An error that says nothing gives None."""
        assert retry_after_of(ValueError()) is None
        assert retry_after_of(None) is None
