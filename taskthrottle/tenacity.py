"""Tenacity policies that understand refusals and upstream pushback.

    from tenacity import retry
    from taskthrottle.tenacity import retry_refused_or, stop_after_failures, wait_retry_after

    @retry(wait=wait_retry_after(), retry=retry_refused_or(ConnectionError),
           stop=stop_after_failures(5))
    def call_llm(prompt): ...

`wait_retry_after` waits what a refusal (`Throttled`, `BreakerOpen`) or a 429's
``Retry-After`` says; `stop_after_failures` counts only the attempts that ran and failed,
not those a limit or a breaker refused (they ran nothing). ``pip install tenacity``.
"""

from __future__ import annotations

import weakref
from typing import Any

from taskthrottle._exceptions import InvalidInput, Throttled, require
from taskthrottle.headers import read_headers

require("tenacity", "redis")

import tenacity  # noqa: E402  (after the check that names the missing extra)
from tenacity import RetryCallState  # noqa: E402

#: HTTP statuses whose Retry-After `wait_retry_after` honours.
PUSHBACK_STATUSES = (429, 503)


def retry_after_of(exc: BaseException | None) -> float | None:
    """Seconds ``exc`` says to wait: a refusal's ``retry_after``, or the Retry-After (or
    ``x-ratelimit-reset-*``) of a 429/503 response it carries (``exc.response``, as
    httpx, requests and the OpenAI client raise them); None when it says nothing."""
    if isinstance(exc, Throttled):
        return exc.retry_after
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if getattr(response, "status_code", None) in PUSHBACK_STATUSES and headers is not None:
        return read_headers(headers).retry_after
    return None


def _exception(retry_state: RetryCallState) -> BaseException | None:
    outcome = retry_state.outcome
    return outcome.exception() if outcome is not None and outcome.failed else None


class wait_retry_after(tenacity.wait.wait_base):  # noqa: N801  (tenacity's naming)
    """Wait what the failed attempt said (see `retry_after_of`), at most ``max_wait``
    seconds; otherwise as ``fallback`` (exponential from 0.5 s up to 30 s by default)."""

    def __init__(self, fallback: Any = None, max_wait: float = 300.0) -> None:
        if not max_wait > 0:
            raise InvalidInput(f"max_wait must be above 0 seconds, got {max_wait!r}")
        self.fallback = fallback or tenacity.wait_exponential(multiplier=0.5, max=30)
        self.max_wait = max_wait

    def __call__(self, retry_state: RetryCallState) -> float:
        said = retry_after_of(_exception(retry_state))
        if said is not None:
            return min(said, self.max_wait)
        return float(self.fallback(retry_state))


class retry_refused_or(tenacity.retry_base):  # noqa: N801
    """Retry an attempt that a limit or a breaker refused (a `Throttled`), or that failed
    with one of ``exceptions``."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __call__(self, retry_state: RetryCallState) -> bool:
        exc = _exception(retry_state)
        return isinstance(exc, (Throttled, *self.exceptions))


class stop_after_failures(tenacity.stop.stop_base):  # noqa: N801
    """Stop once ``attempts`` attempts have failed other than by a refusal (`Throttled`,
    `BreakerOpen` included): a refused attempt ran nothing, and is not counted."""

    def __init__(self, attempts: int) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidInput(f"attempts must be a whole number of at least 1, got {attempts!r}")
        self.attempts = attempts
        self._failures: weakref.WeakKeyDictionary[RetryCallState, int] = weakref.WeakKeyDictionary()

    def __call__(self, retry_state: RetryCallState) -> bool:
        failures = self._failures.get(retry_state, 0)
        if not isinstance(_exception(retry_state), Throttled):
            failures += 1
            self._failures[retry_state] = failures
        return failures >= self.attempts
