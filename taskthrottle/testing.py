"""Helpers for testing code that uses taskthrottle: a clock you move by hand."""

from __future__ import annotations

import math
import threading

from taskthrottle._exceptions import InvalidInput
from taskthrottle._limiter import Limiter
from taskthrottle._memory import MemoryStore

#: 2023-11-14 22:13:20 UTC: a fixed, ordinary moment to start manual clocks at.
DEFAULT_START = 1_700_000_000.0


class ManualClock:
    """A clock (float seconds, like `time.time`) that moves only when told.

    Pass it to `MemoryStore(clock=...)` or, in tests, `RedisStore(clock=...)`.
    """

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._ns = round(start * 1e9)  # integer nanoseconds: many small steps add up exactly
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The current time in seconds."""
        return self._ns / 1e9

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` (a negative value steps back, as after a failover)."""
        if not math.isfinite(seconds):
            raise InvalidInput(f"cannot advance a clock by {seconds!r}")
        with self._lock:
            self._ns += round(seconds * 1e9)

    def set(self, when: float) -> None:
        """Jump to ``when`` (seconds since the epoch)."""
        if not math.isfinite(when):
            raise InvalidInput(f"cannot set a clock to {when!r}")
        self._ns = round(when * 1e9)


def memory_limiter(clock: ManualClock | None = None) -> Limiter:
    """A limiter on a fresh `MemoryStore`, on ``clock`` when given: for users' unit tests."""
    return Limiter(MemoryStore() if clock is None else MemoryStore(clock=clock))
