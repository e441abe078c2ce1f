"""Dramatiq: taskthrottle's middleware beside dramatiq.rate_limits.BucketRateLimiter.

    python -m bench.bench_dramatiq --redis redis://127.0.0.1:6379/9 --messages 400

The same workload (messages sent at once, a 20/s limit, 2 worker processes x 2 threads,
Redis broker) through each: completion time and deliveries per message. The peer raises
inside the actor and leaves the rest to the Retries middleware (its defaults: 15 s minimum
backoff, doubling); its run is cut off after ``--deadline`` seconds.
Writes its section of docs/benchmarks.md (``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench._report import machine, write_section

ROOT = Path(__file__).parent.parent


def run(env: dict[str, str], actor: str, messages: int, deadline: float) -> tuple[float, int, int]:
    """Seconds until all ran (or the deadline), messages done, deliveries."""
    client = redis.Redis.from_url(env["BENCH_REDIS"])
    cmd = [
        sys.executable,
        "-m",
        "dramatiq",
        "bench.dramatiq_app",
        "--processes",
        "2",
        "--threads",
        "2",
        "--queues",
        env["BENCH_NS"],
    ]
    workers = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        os.environ.update(env)
        import bench.dramatiq_app as app

        send = getattr(app, actor).send
        start = time.monotonic()
        for i in range(messages):
            send(i)
        done = 0
        while time.monotonic() - start < deadline:
            counted_done: Any = client.get(f"{env['BENCH_NS']}:done:{actor}")
            done = int(counted_done or 0)
            if done >= messages:
                break
            time.sleep(0.1)
        took = time.monotonic() - start
        counted: Any = client.get(f"{env['BENCH_NS']}:deliveries:{actor}")
        return took, done, int(counted or 0)
    finally:
        workers.send_signal(signal.SIGTERM)
        workers.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--output", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args(argv)
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BENCH_REDIS": args.redis, "BENCH_NS": ns, "BENCH_RATE": str(args.rate)}
    client = redis.Redis.from_url(args.redis)
    rows = [
        "| limiter | messages | done | took s | deliveries per message |",
        "|---|---|---|---|---|",
    ]
    try:
        for name, actor in (
            ("taskthrottle ThrottleMiddleware", "ours"),
            ("dramatiq BucketRateLimiter + Retries", "theirs"),
        ):
            took, done, deliveries = run(env, actor, args.messages, args.deadline)
            cut = "" if done >= args.messages else f" (cut off at {args.deadline:g} s)"
            rows.append(
                f"| {name} | {args.messages} | {done} | {took:.1f}{cut} | "
                f"{deliveries / args.messages:.2f} |"
            )
    finally:
        for key in client.scan_iter(match=f"*{ns}*", count=1000):
            client.delete(key)
    ideal = args.messages / args.rate
    body = [
        *machine(client),
        "",
        f"{args.messages} messages sent at once, a {args.rate}/s limit "
        f"(at best {ideal:.0f} s), 2 worker processes x 2 threads, Redis broker.",
        "",
        *rows,
    ]
    write_section(args.output, "dramatiq side by side", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
