"""The ``taskthrottle`` command."""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskthrottle._exceptions import TaskThrottleError, Throttled
from taskthrottle._limiter import Limiter
from taskthrottle._limits import Limit
from taskthrottle._memory import MemoryStore

#: The largest token estimate a demo request makes.
MAX_ESTIMATE = 800


@dataclass
class _Second:
    admitted: int = 0
    refused: int = 0
    tokens: float = 0.0
    waits: list[float] = field(default_factory=list)


class _Tally:
    """Per-second counts shared by the demo's threads."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.lock = threading.Lock()
        self.seconds: dict[int, _Second] = {}

    def record(self, tokens: float = 0.0, wait: float | None = None) -> None:
        with self.lock:
            second = self.seconds.setdefault(int(time.monotonic() - self.start), _Second())
            if wait is None:
                second.admitted += 1
                second.tokens += tokens
            else:
                second.refused += 1
                second.waits.append(wait)


def _client(limiter: Limiter, limits: list[Limit], tally: _Tally, until: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        estimate = rng.randint(MAX_ESTIMATE // 4, MAX_ESTIMATE)
        try:
            lease = limiter.acquire("tenant:demo", limits, consume={"tpm": estimate})
        except Throttled as exc:
            tally.record(wait=exc.retry_after)
            time.sleep(min(exc.retry_after, max(0.0, until - time.monotonic())))
            continue
        time.sleep(rng.uniform(0.01, 0.05))  # the call to the rate-limited service
        actual = max(1, round(estimate * rng.uniform(0.7, 1.4)))
        lease.adjust(tpm=actual - estimate)
        lease.release()
        tally.record(tokens=actual)


def demo(args: argparse.Namespace) -> int:
    """Push requests from a few threads through rpm and tpm limits; print each second."""
    where = "the embedded MemoryStore"
    if args.redis:
        from taskthrottle._redis import RedisStore, redact

        limiter = Limiter(RedisStore.from_url(args.redis, namespace=args.namespace))
        where = redact(args.redis)  # a terminal, a CI log: no place for the password
    else:
        limiter = Limiter(MemoryStore())
    limits = [  # bursts of five seconds' worth (at least two requests), so the rate shows soon
        Limit.per_minute("rpm", args.rpm, burst=max(2, args.rpm / 12)),
        Limit.per_minute("tpm", args.tpm, burst=max(2 * MAX_ESTIMATE, args.tpm / 12)),
    ]
    limiter.reset("tenant:demo")
    print(f"{args.threads} threads, {args.seconds}s, limits {limits[0]} | {limits[1]}, on {where}")
    print(f"{'second':>6} {'admitted':>8} {'refused':>8} {'tokens':>8} {'mean retry-after':>17}")
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
            f"{second + 1:>6} {row.admitted:>8} {row.refused:>8} {row.tokens:>8.0f} {mean:>16.3f}s"
        )
    for thread in threads:
        thread.join()
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line of ``taskthrottle``."""
    top = argparse.ArgumentParser(prog="taskthrottle", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="show limits at work, second by second")
    run.add_argument("--redis", metavar="URL", help="use a RedisStore at URL (default: memory)")
    run.add_argument("--namespace", default="taskthrottle-demo", help="Redis namespace")
    run.add_argument("--seconds", type=int, default=10)
    run.add_argument("--threads", type=int, default=4)
    run.add_argument("--rpm", type=float, default=300, help="requests per minute")
    run.add_argument("--tpm", type=float, default=60_000, help="tokens per minute")
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
