"""Upstream pushback: 429s from a provider whose burst is smaller than the limiter's.

    python -m bench.bench_pushback --redis redis://127.0.0.1:6379/9 --rate 20 --jobs 400

A simulated provider keeps token buckets for requests and tokens (``--rate`` requests a
second, bursting to one second's worth) and answers 429 with ``Retry-After``,
``retry-after-ms`` and ``x-ratelimit-*`` headers. Threads call it through a limiter with
the keyword form's limits (``@throttled(rpm=rate * 60, tpm=...)``: a burst of a whole
minute), honouring Retry-After, once without and once with ``limiter.pushback``.
Writes its section of docs/benchmarks.md (``--output``; ``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import redis

from bench._report import machine, write_section
from taskthrottle import Limit, Limiter, RedisStore
from taskthrottle.headers import read_headers

ROOT = Path(__file__).parent.parent
TOKENS_PER_CALL = 50


class Response(NamedTuple):
    status: int
    headers: dict[str, str]


class Provider:
    """An LLM-like API: a request bucket and a token bucket, each bursting to one second's
    worth; a call that does not fit both is answered 429 and charged nothing."""

    def __init__(self, rate: float, tokens_per_second: float) -> None:
        self.rates = {"requests": rate, "tokens": tokens_per_second}
        self.level = dict(self.rates)  # full: one second's worth
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def call(self, tokens: int) -> Response:
        with self.lock:
            now = time.monotonic()
            for name, rate in self.rates.items():
                self.level[name] = min(rate, self.level[name] + (now - self.at) * rate)
            self.at = now
            need = {"requests": 1.0, "tokens": float(tokens)}
            waits = {n: max(0.0, (need[n] - self.level[n]) / self.rates[n]) for n in need}
            if max(waits.values()) == 0:
                for name, amount in need.items():
                    self.level[name] -= amount
            headers = {f"x-ratelimit-remaining-{n}": str(int(v)) for n, v in self.level.items()}
            for name, rate in self.rates.items():
                headers[f"x-ratelimit-reset-{name}"] = f"{(rate - self.level[name]) / rate:.3f}"
        wait = max(waits.values())
        if wait == 0:
            return Response(200, headers)
        headers["retry-after"] = str(math.ceil(wait))
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        return Response(429, headers)


class Run(NamedTuple):
    calls: int
    rejected: int
    rejected_after_first_second: int
    seconds: float


def run(limiter: Limiter, rate: float, jobs: int, threads: int, pushback: bool) -> Run:
    """``jobs`` calls by ``threads`` threads through ``limiter``, each retried after a 429."""
    rpm = Limit.per_minute("rpm", rate * 60)  # what @throttled(rpm=...) builds
    tpm = Limit.per_minute("tpm", rate * 60 * TOKENS_PER_CALL * 2)
    provider = Provider(rate, rate * TOKENS_PER_CALL * 2)
    left = iter(range(jobs))
    lock = threading.Lock()
    rejected: list[float] = []
    calls = [0]
    key = f"provider-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            while True:
                turn = limiter.reserve(key, [rpm, tpm], {"tpm": TOKENS_PER_CALL}, max_wait=300)
                time.sleep(turn.delay)
                response = provider.call(TOKENS_PER_CALL)
                with lock:
                    calls[0] += 1
                if response.status == 200:
                    break
                hint = read_headers(response.headers)
                with lock:
                    rejected.append(time.monotonic() - start)
                if pushback:
                    remaining = {"rpm": hint.remaining["requests"], "tpm": hint.remaining["tokens"]}
                    limiter.pushback(key, hint.retry_after, remaining=remaining, limits=[rpm, tpm])
                time.sleep(hint.retry_after or 0.0)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    late = sum(1 for t in rejected if t >= 1.0)
    return Run(calls[0], len(rejected), late, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--rate", type=float, default=20.0, help="provider requests/s")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--output", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis)
    namespace = f"bench-pushback-{uuid.uuid4().hex[:8]}"
    limiter = Limiter(RedisStore.from_url(args.redis, namespace=namespace))
    rows = []
    try:
        for pushback in (False, True):
            found = run(limiter, args.rate, args.jobs, args.threads, pushback)
            label = "with pushback" if pushback else "without pushback (Retry-After honoured)"
            rows.append(
                f"| {label} | {args.jobs} | {found.calls} | {found.rejected} | "
                f"{found.rejected_after_first_second} | {found.seconds:.1f} |"
            )
    finally:
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    rate = args.rate
    body = [
        f"{args.jobs} calls by {args.threads} threads to a simulated provider allowing "
        f"{rate:g} requests/s (and {rate * TOKENS_PER_CALL * 2:g} tokens/s), each bucket "
        f"bursting to one second's worth; the limiter has the keyword form's limits, "
        f"`rpm={rate * 60:g}` (a burst of {rate * 60:g}) and `tpm`, on Redis. Each call "
        f"asks {TOKENS_PER_CALL} tokens; a 429 is retried through the limiter after its "
        "Retry-After. With pushback, a 429 also calls `limiter.pushback(key, "
        "retry_after, remaining=...)` with what its headers say.",
        "",
        *machine(client),
        "",
        "| run | jobs | provider calls | 429s | 429s after the first second | seconds |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    write_section(args.output, "upstream pushback", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
