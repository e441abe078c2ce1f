"""Eight processes share one breaker on the real Redis: one process's failures open it for
all at once, and half-open lets exactly the probe budget through across the fleet."""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.synchronize import Event

from taskthrottle import Breaker, BreakerOpen, Limiter, RedisStore
from tests.helpers import wait_for

PROCESSES = 8
PROBES = 3
RULES = {"failure_threshold": 3, "half_open_max_calls": PROBES, "probe_timeout": 120.0}


def breaker_in(url: str, namespace: str, recovery: float) -> Breaker:
    limiter = Limiter(RedisStore.from_url(url, namespace=namespace))
    return Breaker("callee", limiter, recovery_timeout=recovery, **RULES)  # type: ignore[arg-type]


def fail(breaker: Breaker, times: int) -> None:
    """Calls through ``breaker`` that fail."""
    for _ in range(times):
        with contextlib.suppress(ConnectionError), breaker:
            raise ConnectionError("callee down")


def ask_once(
    url: str, namespace: str, recovery: float, ready: multiprocessing.Queue[str], go: Event,
    out: multiprocessing.Queue[str],
) -> None:  # fmt: skip
    """Make the breaker (as a worker starting would), then ask to pass once, on the signal;
    a pass is a probe never reported, holding its slot."""
    breaker = breaker_in(url, namespace, recovery)
    breaker.state()  # connected, scripts loaded: the signal finds every process ready
    ready.put("ready")
    go.wait()
    try:
        breaker.enter()
    except BreakerOpen as exc:
        out.put(f"refused {exc.state}")
    else:
        out.put("passed")


def run_fleet(url: str, namespace: str, recovery: float, before_go: object) -> list[str]:
    """Start the processes, run ``before_go`` once all are ready, then let them ask."""
    ctx = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[str] = ctx.Queue()
    out: multiprocessing.Queue[str] = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=ask_once, args=(url, namespace, recovery, ready, go, out))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        before_go()  # type: ignore[operator]
        go.set()
        answers = sorted(out.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return answers


def test_one_process_opens_it_for_every_other(redis_url: str, namespace: str) -> None:
    """Three failures here, and each of eight other processes is refused at its first call."""
    breaker = breaker_in(redis_url, namespace, recovery=300.0)

    def cross_threshold() -> None:
        fail(breaker, 3)

    answers = run_fleet(redis_url, namespace, 300.0, cross_threshold)
    assert answers == ["refused open"] * PROCESSES


def test_half_open_admits_exactly_the_probe_budget(redis_url: str, namespace: str) -> None:
    """Once the recovery timeout has passed, eight processes ask at once: exactly
    half_open_max_calls pass, across all of them; the rest are refused as half-open."""
    breaker = breaker_in(redis_url, namespace, recovery=0.2)

    def open_then_wait_for_half_open() -> None:
        fail(breaker, 3)
        assert breaker.state().state == "open"
        wait_for(lambda: breaker.state().state == "half-open", 10, "the breaker to half-open")

    answers = run_fleet(redis_url, namespace, 0.2, open_then_wait_for_half_open)
    assert answers.count("passed") == PROBES
    assert answers.count("refused half-open") == PROCESSES - PROBES
    assert breaker.state().probes == PROBES
