"""Polling with a deadline: the only way the fault suite waits for anything."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(check: Callable[[], bool], seconds: float, every: float = 0.05) -> bool:
    """Call ``check`` until it holds or ``seconds`` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def wait_until(check: Callable[[], bool], seconds: float, what: str, every: float = 0.05) -> None:
    """`poll`, failing with ``what`` when the deadline passes."""
    if not poll(check, seconds, every):
        raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")
