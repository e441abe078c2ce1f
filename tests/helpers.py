"""Helpers the tests share: polling with a deadline, the workers' journal, process facts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis


def wait_for(check: Callable[[], bool], seconds: float, what: str, every: float = 0.05) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def journal(redis_url: str, ns: str) -> list[tuple[str, str, float, str]]:
    """The events the test apps record: (kind, task or message id, time, extra)."""
    client = redis.Redis.from_url(redis_url)
    found: Any = client.lrange(f"{ns}:journal", 0, -1)
    rows = []
    for raw in found:
        kind, task_id, when, *extra = raw.decode().split(" ")
        rows.append((kind, task_id, float(when), " ".join(extra)))
    return rows


def most_in_any_second(times: list[float]) -> int:
    """The most of the sorted ``times`` that fall within one second of each other."""
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the pool), in KiB."""
    total = 0
    for task in [str(pid), *Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        for line in Path(f"/proc/{task}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def kill_runner(redis_url: str, ns: str, task_id: str) -> None:
    """SIGKILL the process that journalled the start of ``task_id`` (its "pid=" extra)."""
    (row,) = [r for r in journal(redis_url, ns) if r[0] == "start" and r[1] == task_id]
    os.kill(int(row[3].removeprefix("pid=")), signal.SIGKILL)
