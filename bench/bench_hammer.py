"""Many processes hammering one key: attempts per second, taskthrottle against a peer and
the floor, in one run.

    python -m bench.bench_hammer --redis redis://127.0.0.1:6379/0 --processes 8 --seconds 3

Each process calls as fast as it can on one shared key whose limit refuses most calls
(200 a second): what a fleet of workers does to the store under a backlog. The contenders
take turns, round by round, so that drift on a busy machine hits all alike.
Writes its section of docs/benchmarks.md (``--output``; ``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path

import redis

from bench._report import machine, write_section
from bench.bench_acquire import FLOOR_LUA
from taskthrottle import Limit, Limiter, RedisStore, Throttled

RATE = 200  # grants per second on the shared key

Attempt = Callable[[], bool]


def contender(name: str, url: str, namespace: str) -> Attempt:
    """One attempt on the shared key, True when granted, as each contender makes it."""
    if name == "taskthrottle":
        limiter = Limiter(RedisStore.from_url(url, namespace=namespace))
        limit = Limit.per_second("rps", RATE, burst=RATE // 10)

        def attempt() -> bool:
            try:
                limiter.acquire("shared", [limit], consume={"rps": 1})
            except Throttled:
                return False
            return True

        return attempt
    if name == "throttled-py":
        import throttled

        bucket = throttled.Throttled(
            key=f"{namespace}-throttled",
            using=throttled.RateLimiterType.TOKEN_BUCKET.value,
            quota=throttled.rate_limiter.per_sec(RATE, burst=RATE // 10),
            store=throttled.RedisStore(server=url),
        )
        return lambda: not bucket.limit(cost=1).limited
    client = redis.Redis.from_url(url)
    sha = str(client.script_load(FLOOR_LUA))
    key = f"{{{namespace}}}:floor"
    return lambda: client.evalsha(sha, 1, key, RATE // 10, RATE / 1000) == 1


def hammer(
    name: str,
    url: str,
    namespace: str,
    seconds: float,
    go: Event,
    out: multiprocessing.Queue[tuple[int, int]],
) -> None:
    """Attempt as fast as possible for ``seconds``; report (attempts, grants)."""
    attempt = contender(name, url, namespace)
    attempt()  # connect, load scripts
    go.wait()
    deadline = time.monotonic() + seconds
    attempts = grants = 0
    while time.monotonic() < deadline:
        grants += attempt()
        attempts += 1
    out.put((attempts, grants))


def one_round(name: str, url: str, processes: int, seconds: float) -> tuple[float, float]:
    """Attempts and grants per second of ``processes`` processes on a fresh key."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    namespace = f"hammer-{uuid.uuid4().hex[:8]}"
    workers = [
        ctx.Process(target=hammer, args=(name, url, namespace, seconds, go, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let every process connect before the start
    go.set()
    try:
        reports = [out.get(timeout=seconds + 60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"*{namespace}*"):
        client.delete(key)
    return sum(a for a, _ in reports) / seconds, sum(g for _, g in reports) / seconds


def available() -> list[str]:
    """The contenders whose libraries are installed."""
    names = ["floor: bare EVALSHA, 1-key token bucket", "taskthrottle"]
    try:
        import throttled  # noqa: F401
    except ImportError:
        return names
    return [*names, "throttled-py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent.parent / "docs/benchmarks.md")
    )
    args = parser.parse_args(argv)
    names = available()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(one_round(name, args.redis, args.processes, args.seconds))
    rows = [
        f"| {name} | {statistics.median(a for a, _ in runs):,.0f} "
        f"| {statistics.median(g for _, g in runs):,.0f} |"
        for name, runs in results.items()
    ]
    body = [
        f"{args.processes} processes attempt as fast as they can for {args.seconds:g} s on one "
        f"key limited to {RATE} a second (taskthrottle with `consume` given), "
        f"{args.rounds} rounds, contenders in turn; medians over rounds.",
        "",
        *machine(redis.Redis.from_url(args.redis)),
        "",
        "| contender | attempts/s | grants/s |",
        "|---|---|---|",
        *rows,
        "",
        "Attempts per second are what the store sustains. throttled-py 3.5's Redis token bucket",
        "reported every call of this setup as allowed (its in-memory store refuses as expected),",
        "so its grants are not comparable; its attempts are.",
    ]
    write_section(args.output, "hammer", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
