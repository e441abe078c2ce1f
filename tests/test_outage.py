"""The limiter while its store fails: each on_store_error policy, probing, and the log."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from taskthrottle import (
    InvalidInput,
    Limit,
    Limiter,
    MemoryStore,
    StoreError,
    StoreUnavailable,
    Throttled,
)
from taskthrottle.testing import ManualClock

rpm = Limit.per_minute("rpm", 10)
tpm = Limit.per_minute("tpm", 1000)


class FlakyStore(MemoryStore):
    """A MemoryStore that fails every call while ``down``, and counts the calls it got."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.calls = 0

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreError("redis is down (simulated)")

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return super().acquire(*args, **kwargs)

    def settle(self, *args: Any, **kwargs: Any) -> None:
        self._gate()
        super().settle(*args, **kwargs)

    def peek(self, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return super().peek(*args, **kwargs)


def limiter_over(store: FlakyStore, clock: ManualClock, **kwargs: Any) -> Limiter:
    limiter = Limiter(store, **kwargs)
    limiter.outage._clock = clock  # the outage's probe timer on the test's clock
    return limiter


def test_defer_raises_a_throttled_with_the_store_retry(clock: ManualClock) -> None:
    """Under "defer" a failed acquire is a `Throttled` (a `StoreUnavailable`) whose
    retry-after is ``store_retry``, so code that waits on Throttled waits on an outage too."""
    store = FlakyStore(clock)
    limiter = limiter_over(store, clock, store_retry=2.5)
    store.down = True
    with pytest.raises(Throttled) as caught:
        limiter.acquire("k", [rpm])
    assert isinstance(caught.value, StoreUnavailable)
    assert caught.value.retry_after == 2.5
    assert caught.value.violations == ()


def test_a_down_store_is_probed_once_a_second_and_used_again(clock: ManualClock) -> None:
    """While the store is down, calls fail at once without reaching it; one call a second
    probes it; once it answers every call uses it again, without a restart."""
    store = FlakyStore(clock)
    limiter = limiter_over(store, clock)
    store.down = True
    for _ in range(20):
        with pytest.raises(StoreUnavailable):
            limiter.acquire("k", [rpm])
    assert store.calls == 1
    clock.advance(1.01)
    with pytest.raises(StoreUnavailable):
        limiter.acquire("k", [rpm])
    assert store.calls == 2
    store.down = False
    with pytest.raises(StoreUnavailable):  # not probed again within the second
        limiter.acquire("k", [rpm])
    clock.advance(1.01)
    limiter.acquire("k", [rpm])
    limiter.acquire("k", [rpm])
    assert store.calls == 4
    assert limiter.available("k", [rpm]) == {"rpm": 8.0}


def test_an_outage_logs_once_when_it_starts_and_once_when_it_ends(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One ERROR line, one INFO line with how long and what was done; nothing per call."""
    store = FlakyStore(clock)
    limiter = limiter_over(store, clock)
    store.down = True
    with caplog.at_level(logging.INFO, logger="taskthrottle"):
        for _ in range(30):
            with pytest.raises(StoreUnavailable):
                limiter.acquire("k", [rpm])
        clock.advance(7)
        store.down = False
        limiter.acquire("k", [rpm])
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["ERROR", "INFO"], lines
    assert "on_store_error='defer'" in lines[0][1]
    assert "after 7.0 s" in lines[1][1] and "30 deferred" in lines[1][1]


def test_allow_grants_a_lease_that_settles_nowhere(clock: ManualClock) -> None:
    """Under "allow" the request is granted; its adjust and release change nothing."""
    store = FlakyStore(clock)
    limiter = limiter_over(store, clock, on_store_error="allow")
    store.down = True
    with limiter.acquire("k", [rpm, tpm], consume={"tpm": 500}) as lease:
        lease.adjust(tpm=100)
    assert lease.consumed == {"rpm": 1.0, "tpm": 600.0}
    assert store.calls == 1
    store.down = False
    clock.advance(1.01)
    assert limiter.available("k", [rpm, tpm]) == {"rpm": 10.0, "tpm": 1000.0}


def test_local_takes_its_share_of_each_limit(clock: ManualClock) -> None:
    """Under "local" this process decides alone, with local_share of each limit, and leaves
    the local state once the store answers again."""
    store = FlakyStore(clock)
    limiter = limiter_over(store, clock, on_store_error="local", local_share=0.3)
    store.down = True
    for _ in range(3):  # 30% of 10
        limiter.acquire("k", [rpm])
    with pytest.raises(Throttled) as caught:
        limiter.acquire("k", [rpm])
    assert not isinstance(caught.value, StoreUnavailable)
    store.down = False
    clock.advance(1.01)
    limiter.acquire("k", [rpm])
    assert limiter.available("k", [rpm]) == {"rpm": 9.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_store_error": "ignore"}, "'ignore'"),
        ({"on_store_error": "local"}, "needs local_share"),
        ({"on_store_error": "local", "local_share": 0}, "got 0"),
        ({"on_store_error": "local", "local_share": 1.5}, "got 1.5"),
        ({"store_retry": -1}, "-1"),
    ],
)
def test_bad_failure_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    """Each bad setting is named in the error."""
    with pytest.raises(InvalidInput, match=match):
        Limiter(MemoryStore(), **kwargs)


class ReplyLostStore(MemoryStore):
    """Applies a settle, then fails as if its reply were lost, once."""

    lose_next = False

    def settle(self, *args: Any, **kwargs: Any) -> None:
        super().settle(*args, **kwargs)
        if self.lose_next:
            self.lose_next = False
            raise StoreError("reply lost (simulated)")


def test_an_adjust_retried_after_a_lost_reply_charges_once(clock: ManualClock) -> None:
    """Retrying an adjust after a StoreError sends the same op: it is charged once. A retry
    with other amounts is refused, naming both."""
    store = ReplyLostStore(clock=clock)
    limiter = Limiter(store)
    limiter.outage._clock = clock
    lease = limiter.acquire("k", [tpm], consume={"tpm": 100})
    store.lose_next = True
    with pytest.raises(StoreError):
        lease.adjust(tpm=50)
    with pytest.raises(InvalidInput, match=r"tpm=\+50.*tpm=\+70"):
        lease.adjust(tpm=70)
    clock.advance(1.01)  # a failed store is left alone for a second
    lease.adjust(tpm=50)
    assert lease.consumed == {"tpm": 150.0}
    refilled = 1000 / 60 * 1.01
    assert limiter.available("k", [tpm])["tpm"] == pytest.approx(850 + refilled, abs=0.01)
    lease.adjust(tpm=-50)  # the next adjust is a new op
    assert limiter.available("k", [tpm])["tpm"] == pytest.approx(900 + refilled, abs=0.01)
