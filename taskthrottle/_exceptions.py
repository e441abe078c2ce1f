"""Every exception taskthrottle raises.

TaskThrottleError
├── Throttled                  the request must wait: carries retry_after and violations
│   ├── StoreUnavailable       the store failed and on_store_error is "defer"
│   └── BreakerOpen            a circuit breaker refuses calls for now
├── StoreError                 the store (Redis) failed or answered nonsense
├── InvalidInput (ValueError)  bad arguments; nothing was changed
│   └── RequestTooLarge        the request exceeds a limit's capacity and can never pass
├── InvalidType (TypeError)    an argument of the wrong type; nothing was changed
└── MissingDependency (ImportError)  an optional extra is not installed
"""

from __future__ import annotations

from typing import NamedTuple


class TaskThrottleError(Exception):
    """The root of every taskthrottle exception."""


class Violation(NamedTuple):
    """One limit that refused a request: where, which, and for how long (seconds)."""

    key: str
    limit: str
    retry_after: float


class Throttled(TaskThrottleError):
    """Raised when a request cannot pass now.

    ``retry_after`` is the number of seconds after which every violated limit
    could grant the whole request; ``violations`` names each refusing limit with
    its key.
    """

    def __init__(self, retry_after: float, violations: tuple[Violation, ...]) -> None:
        self.retry_after = retry_after
        self.violations = violations
        names = ", ".join(f"{v.key!r}/{v.limit}" for v in violations)
        super().__init__(f"throttled by {names}; retry after {retry_after:.3f}s")


class StoreUnavailable(Throttled):
    """Raised instead of a decision while the store fails, under ``on_store_error="defer"``:
    try again after ``retry_after`` seconds. It names no violations."""

    def __init__(self, retry_after: float, cause: StoreError) -> None:
        self.retry_after = retry_after
        self.violations = ()
        self.cause = cause
        TaskThrottleError.__init__(
            self, f"the store is unavailable ({cause}); retry after {retry_after:.3f}s"
        )


class BreakerOpen(Throttled):
    """Raised when a circuit breaker refuses a call: it is open, or half-open with every
    probe slot taken. ``retry_after`` is the time left before a call could pass;
    ``breaker`` names it and ``state`` is "open" or "half-open".

    A `Throttled`, because it means the same thing to everyone who handles one: nothing
    was done, try again after ``retry_after``. The task gates reschedule a refused task
    through their existing deferral path, never failing it nor counting a retry, and
    retry policies that honour ``Throttled.retry_after`` honour it too.
    """

    def __init__(self, breaker: str, retry_after: float, state: str) -> None:
        self.retry_after = retry_after
        self.violations = (Violation(breaker, f"breaker {state}", retry_after),)
        self.breaker = breaker
        self.state = state
        TaskThrottleError.__init__(
            self, f"breaker {breaker!r} is {state}; retry after {retry_after:.3f}s"
        )


class StoreError(TaskThrottleError):
    """Raised when the store fails (a connection error, a timeout, a bad reply)."""


class InvalidInput(TaskThrottleError, ValueError):
    """Raised for a bad value: the message names it, and nothing was changed."""


class RequestTooLarge(InvalidInput):
    """Raised when a request asks more than a limit can ever hold; retrying cannot help."""


class InvalidType(TaskThrottleError, TypeError):
    """Raised for an argument of the wrong type; nothing was changed."""


class MissingDependency(TaskThrottleError, ImportError):
    """Raised when an optional dependency is missing; the message gives the pip line."""


def require(module: str, extra: str) -> None:
    """Raise `MissingDependency` naming the extra to install when ``module`` is absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        msg = f"{module!r} is not installed: pip install 'taskthrottle[{extra}]'"
        raise MissingDependency(msg)
