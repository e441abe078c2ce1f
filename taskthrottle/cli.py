"""The taskthrottle command: `taskthrottle demo` shows rate limits at work, second by second.

The command is argparse, of the standard library, so that it runs on a plain
``pip install taskthrottle``; `taskthrottle demo --redis URL` then needs the redis extra.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskthrottle import __version__
from taskthrottle._exceptions import TaskThrottleError, Throttled
from taskthrottle._limiter import Limiter
from taskthrottle._limits import Limit
from taskthrottle._memory import MemoryStore

#: The largest token estimate a demo request makes.
MAX_ESTIMATE = 800

#: The key whose budget the demo's requests spend.
KEY = "tenant:demo"


@dataclass
class _Second:
    admitted: int = 0
    refused: int = 0
    tokens: float = 0.0
    waits: list[float] = field(default_factory=list)
    binding: Counter[str] = field(default_factory=Counter)


class _Tally:
    """Per-second counts shared by the demo's threads."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.lock = threading.Lock()
        self.seconds: dict[int, _Second] = {}

    def admitted(self, tokens: float) -> None:
        """Count a request let through, and the tokens it really used."""
        with self.lock:
            second = self.seconds.setdefault(int(time.monotonic() - self.start), _Second())
            second.admitted += 1
            second.tokens += tokens

    def refused(self, exc: Throttled) -> None:
        """Count an attempt refused, its retry-after, and the limits that refused it."""
        with self.lock:
            second = self.seconds.setdefault(int(time.monotonic() - self.start), _Second())
            second.refused += 1
            second.waits.append(exc.retry_after)
            second.binding.update({v.limit for v in exc.violations})


def _client(limiter: Limiter, limits: list[Limit], tally: _Tally, until: float, seed: int) -> None:
    """One caller: asks for a request, and when refused waits the retry-after and asks again
    for the same request; then calls the "service" and adjusts to the tokens it used."""
    rng = random.Random(seed)
    estimate = rng.randint(MAX_ESTIMATE // 4, MAX_ESTIMATE)
    while time.monotonic() < until:
        try:
            lease = limiter.acquire(KEY, limits, consume={"tpm": estimate})
        except Throttled as exc:
            tally.refused(exc)
            time.sleep(min(exc.retry_after, max(0.0, until - time.monotonic())))
            continue
        time.sleep(rng.uniform(0.01, 0.05))  # the call to the rate-limited service
        actual = max(1, round(estimate * rng.uniform(0.7, 1.4)))
        lease.adjust(tpm=actual - estimate)
        lease.release()
        tally.admitted(actual)
        estimate = rng.randint(MAX_ESTIMATE // 4, MAX_ESTIMATE)


def _binding(counts: Counter[str]) -> str:
    """The limits that refused, most refusals first; "-" for none."""
    return ", ".join(name for name, _ in counts.most_common()) or "-"


def _describe(limit: Limit, unit: str) -> str:
    """One line on a limit: its rate a minute and a second, and its burst."""
    per_second = limit.rate / limit.period
    return (
        f"  {limit.name}: {limit.rate:,g} {unit} a minute ({per_second:,g}/s),"
        f" bursts of {limit.capacity:,g}"
    )


def _summarize(rows: list[_Second], rpm: Limit, tpm: Limit) -> None:
    """The totals, what the limits allow over as many seconds, which limit bound, and what
    the figures mean."""
    admitted, tokens = sum(row.admitted for row in rows), sum(row.tokens for row in rows)
    refused_by = _binding(sum((row.binding for row in rows), Counter[str]()))
    binding = f"{refused_by} bound" if refused_by != "-" else "no limit refused"
    print(f"{'total':>6} {admitted:>8} {tokens:>8.0f} {sum(row.refused for row in rows):>8}")
    seconds = len(rows)
    allowed_requests = rpm.capacity + rpm.rate / rpm.period * seconds
    allowed_tokens = tpm.capacity + tpm.rate / tpm.period * seconds
    print(
        f"In {seconds} s the limits allow {allowed_requests:,.0f} requests and"
        f" {allowed_tokens:,.0f} tokens (a burst, then the rate);\n"
        f"{admitted:,} requests and {tokens:,.0f} tokens passed: {binding}.\n"
        "Refused counts attempts, not requests: a refused thread sleeps the retry-after,\n"
        "then asks again for the same request, so none is lost.\n"
        "Request sizes come from a seeded generator and the limits decide the rest:\n"
        "runs on memory and on Redis print about the same numbers, by design."
    )


def demo(args: argparse.Namespace) -> int:
    """Push requests from a few threads through rpm and tpm limits; print each second."""
    where = "the embedded MemoryStore"
    if args.redis:
        from taskthrottle._redis import RedisStore, redact

        limiter = Limiter(RedisStore.from_url(args.redis, namespace=args.namespace))
        where = redact(args.redis)  # a terminal, a CI log: no place for the password
    else:
        limiter = Limiter(MemoryStore())
    rpm, tpm = limits = [  # bursts of five seconds' worth (at least two requests)
        Limit.per_minute("rpm", args.rpm, burst=max(2, args.rpm / 12)),
        Limit.per_minute("tpm", args.tpm, burst=max(2 * MAX_ESTIMATE, args.tpm / 12)),
    ]
    limiter.reset(KEY)
    print(f"{args.threads} threads ask for {args.seconds} s, on {where}; the limits of {KEY}:")
    print(_describe(rpm, "requests"))
    print(_describe(tpm, "tokens"))
    print(
        f"Each request takes 1 of rpm and an estimate of {MAX_ESTIMATE // 4}-{MAX_ESTIMATE} of tpm,"
    )
    print("adjusted after the call to the tokens it used.")
    print(
        f"{'second':>6} {'admitted':>8} {'tokens':>8} {'refused':>8} {'mean retry-after':>17}"
        "  refused by"
    )
    start = time.monotonic()
    tally = _Tally(start)
    threads = [
        threading.Thread(target=_client, args=(limiter, limits, tally, start + args.seconds, i))
        for i in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for second in range(args.seconds):
        time.sleep(max(0.0, start + second + 1 - time.monotonic()))
        with tally.lock:
            row = tally.seconds.get(second, _Second())
        mean = sum(row.waits) / len(row.waits) if row.waits else 0.0
        print(
            f"{second + 1:>6} {row.admitted:>8} {row.tokens:>8.0f} {row.refused:>8}"
            f" {mean:>16.3f}s  {_binding(row.binding)}"
        )
    for thread in threads:
        thread.join()
    _summarize([tally.seconds.get(n, _Second()) for n in range(args.seconds)], rpm, tpm)
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line of ``taskthrottle``."""
    top = argparse.ArgumentParser(
        prog="taskthrottle",
        description="One rate limit across a whole fleet of Celery and Dramatiq workers.",
    )
    top.add_argument("--version", action="version", version=f"taskthrottle {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "demo",
        help="show limits at work, second by second",
        description=(
            "Threads push requests through a requests-per-minute and a tokens-per-minute"
            " limit; one table row a second shows what passed and what was refused."
        ),
    )
    run.add_argument(
        "--redis",
        metavar="URL",
        help="keep the limits in the Redis at URL (needs pip install 'taskthrottle[redis]');"
        " without it, in this process's memory",
    )
    run.add_argument(
        "--namespace",
        default="taskthrottle-demo",
        help="prefix of the keys written to Redis (default: %(default)s)",
    )
    run.add_argument(
        "--seconds", type=int, default=10, help="how long to run, in seconds (default: %(default)s)"
    )
    run.add_argument(
        "--threads", type=int, default=4, help="how many callers ask at once (default: %(default)s)"
    )
    run.add_argument(
        "--rpm", type=float, default=300, help="requests allowed per minute (default: %(default)g)"
    )
    run.add_argument(
        "--tpm", type=float, default=60_000, help="tokens allowed per minute (default: %(default)g)"
    )
    run.set_defaults(handler=demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``taskthrottle`` command; returns the exit code."""
    args = parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except TaskThrottleError as exc:
        print(f"taskthrottle: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
