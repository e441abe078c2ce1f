"""Acquire latency: taskthrottle against the floor (a bare EVALSHA) and peers, in one run.

Each strategy (token bucket, fixed window, sliding window) is measured next to the
`limits` strategy that counts the same way: FixedWindow, MovingWindow (an exact sliding
log) and SlidingWindowCounter, on the same Redis and in memory.

    python bench/bench_acquire.py --redis redis://127.0.0.1:6379/0 --iterations 20000

Cases run interleaved in rounds, so that drift on a busy machine hits all alike.
Writes its section of docs/benchmarks.md (``--output``; ``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench._report import Row, machine, write_section
from taskthrottle import Limit, Limiter, MemoryStore, RedisStore

#: The floor: the least an n-key token bucket in one Lua call can do (all keys or none).
FLOOR_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap, rate, ok, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), 1, {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 't', 'a')
  local at = tonumber(v[2]) or now
  tokens[i] = math.min(cap, (tonumber(v[1]) or cap) + (now - at) * rate)
  if tokens[i] < 1 then ok = 0 end
end
if ok == 1 then
  for i = 1, #KEYS do
    redis.call('HSET', KEYS[i], 't', tokens[i] - 1, 'a', now)
    redis.call('PEXPIRE', KEYS[i], 60000)
  end
end
return ok
"""

Case = Callable[[], object]
FLOOR_CASE = "floor: bare EVALSHA, 2-key token bucket"
HIGH = 1_000_000_000  # limits so high that every call admits
FIXED_CASE = "RedisStore acquire, fixed window, 1 limit"
SLIDING_CASE = "RedisStore acquire, sliding window, 1 limit"
LIMITS_FIXED = "peer: limits fixed window, 1 limit"
LIMITS_MOVING = "peer: limits moving window, 1 limit"
LIMITS_SLIDING = "peer: limits sliding window counter, 1 limit"
MEMORY_FIXED = "MemoryStore acquire, fixed window, 1 limit"
MEMORY_SLIDING = "MemoryStore acquire, sliding window, 1 limit"
LIMITS_MEMORY_FIXED = "peer: limits fixed window in memory, 1 limit"
LIMITS_MEMORY_MOVING = "peer: limits moving window in memory, 1 limit"
LIMITS_MEMORY_SLIDING = "peer: limits sliding window counter in memory, 1 limit"
#: What the issue's targets compare, each a paired ratio over the rounds: (case, reference).
PAIRS = [
    ("RedisStore acquire, 1 limit, consume given", LIMITS_FIXED),
    ("RedisStore acquire, 1 limit", LIMITS_FIXED),
    (FIXED_CASE, LIMITS_FIXED),
    (SLIDING_CASE, LIMITS_SLIDING),
    (SLIDING_CASE, LIMITS_MOVING),
    ("MemoryStore acquire, 1 limit", LIMITS_MEMORY_FIXED),
    (MEMORY_FIXED, LIMITS_MEMORY_FIXED),
    (MEMORY_SLIDING, LIMITS_MEMORY_SLIDING),
    (MEMORY_SLIDING, LIMITS_MEMORY_MOVING),
    ("RedisStore acquire, 2 limits, consume given", FLOOR_CASE),
    ("RedisStore acquire, 1 limit, consume given", "RedisStore acquire, 1 limit"),
    ("RedisStore acquire, 2 limits, consume given", "RedisStore acquire, 2 limits"),
    (
        "MemoryStore acquire, 2 limits, consume given",
        "floor: dict token bucket, 2 limits, one lock",
    ),
    ("MemoryStore acquire, 2 limits, consume given", "MemoryStore acquire, 2 limits"),
]


def cases(url: str, namespace: str) -> dict[str, Case]:
    """Every measured Redis call, each admitting; ``consume`` given as LLM tasks give it."""
    client = redis.Redis.from_url(url)
    floor_sha = str(client.script_load(FLOOR_LUA))
    keys = (f"{{{namespace}}}:floor:a", f"{{{namespace}}}:floor:b")
    rpm, tpm = Limit.per_second("rpm", HIGH), Limit.per_second("tpm", HIGH)
    fixed, sliding = window_limits()
    on_redis = Limiter(RedisStore.from_url(url, namespace=namespace))
    both = {"rpm": 1, "tpm": 500}
    found: dict[str, Case] = {
        "redis PING (a bare round trip)": client.ping,
        "floor: bare EVALSHA, 1-key token bucket": lambda: client.evalsha(
            floor_sha, 1, keys[0], HIGH, 1000
        ),
        FLOOR_CASE: lambda: client.evalsha(floor_sha, 2, *keys, HIGH, 1000),
        "RedisStore acquire, 1 limit": lambda: on_redis.acquire("tenant:1", [rpm]),
        "RedisStore acquire, 1 limit, consume given": lambda: on_redis.acquire(
            "tenant:1", [rpm], consume={"rpm": 1}
        ),
        "RedisStore acquire, 2 limits": lambda: on_redis.acquire("tenant:1", [rpm, tpm]),
        "RedisStore acquire, 2 limits, consume given": lambda: on_redis.acquire(
            "tenant:1", [rpm, tpm], consume=both
        ),
        FIXED_CASE: lambda: on_redis.acquire("tenant:1", [fixed]),
        SLIDING_CASE: lambda: on_redis.acquire("tenant:1", [sliding]),
    }
    found.update(peer_cases(url, namespace))
    return found


def window_limits() -> tuple[Limit, Limit]:
    """A fixed and a sliding window of one second, set high so that every call admits."""
    fixed = Limit.per_second("fixed", HIGH, strategy="fixed_window")
    sliding = Limit.per_second("sliding", HIGH, strategy="sliding_window")
    return fixed, sliding


def peer_cases(url: str, namespace: str) -> dict[str, Case]:
    """`limits` and throttled-py on the same Redis, when installed (``[bench]``); two
    limits are two calls for them."""
    found: dict[str, Case] = {}
    try:
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError:
        return found
    storage = RedisStorage(url, key_prefix=f"{namespace}-limits")
    high = RateLimitItemPerSecond(HIGH)
    fixed, moving = FixedWindowRateLimiter(storage), MovingWindowRateLimiter(storage)
    counter = SlidingWindowCounterRateLimiter(storage)
    found[LIMITS_FIXED] = lambda: fixed.hit(high, "one", "rpm")
    found["peer: limits fixed window, 2 limits (2 calls)"] = lambda: (
        fixed.hit(high, "fixed", "rpm") and fixed.hit(high, "fixed", "tpm")
    )
    found[LIMITS_MOVING] = lambda: moving.hit(high, "moving", "rpm")
    found[LIMITS_SLIDING] = lambda: counter.hit(high, "counter", "rpm")
    try:
        import throttled
    except ImportError:
        return found
    bucket = throttled.Throttled(
        key=f"{namespace}-throttled",
        using=throttled.RateLimiterType.TOKEN_BUCKET.value,
        quota=throttled.rate_limiter.per_sec(HIGH, burst=HIGH),
        store=throttled.RedisStore(server=url),
    )
    found["peer: throttled-py token bucket, 1 limit"] = lambda: bucket.limit(cost=1)
    return found


def memory_cases() -> dict[str, Case]:
    """The embedded store, measured on its own (interleaving it with network calls would
    measure cold caches instead), next to the least a 2-limit bucket in a dict can do."""
    rpm, tpm = Limit.per_second("rpm", HIGH), Limit.per_second("tpm", HIGH)
    fixed, sliding = window_limits()
    in_memory = Limiter(MemoryStore())
    found: dict[str, Case] = {
        "floor: dict token bucket, 2 limits, one lock": DictBuckets().acquire,
        "MemoryStore acquire, 1 limit": lambda: in_memory.acquire("tenant:1", [rpm]),
        "MemoryStore acquire, 2 limits": lambda: in_memory.acquire("tenant:1", [rpm, tpm]),
        "MemoryStore acquire, 2 limits, consume given": lambda: in_memory.acquire(
            "tenant:1", [rpm, tpm], consume={"rpm": 1, "tpm": 500}
        ),
        MEMORY_FIXED: lambda: in_memory.acquire("tenant:1", [fixed]),
        MEMORY_SLIDING: lambda: in_memory.acquire("tenant:1", [sliding]),
    }
    try:
        from limits import RateLimitItemPerSecond
        from limits.storage import MemoryStorage
        from limits.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError:
        return found
    storage, high = MemoryStorage(), RateLimitItemPerSecond(HIGH)
    peers: tuple[type[Any], ...] = (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )
    names = (LIMITS_MEMORY_FIXED, LIMITS_MEMORY_MOVING, LIMITS_MEMORY_SLIDING)
    for name, peer in zip(names, peers, strict=True):
        found[name] = hitting(peer(storage), high)
    return found


def hitting(limiter: Any, item: Any) -> Case:
    """A call of a `limits` strategy's ``hit`` of ``item`` under one key."""
    return lambda: limiter.hit(item, "one")


class DictBuckets:
    """Two token buckets in a dict under one lock: the in-memory floor."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = {
            "rpm": (float(HIGH), time.monotonic()),
            "tpm": (float(HIGH), time.monotonic()),
        }

    def acquire(self) -> bool:
        """Take 1 rpm and 500 tpm, both or neither."""
        with self.lock:
            now = time.monotonic()
            levels = {
                name: min(HIGH, level + (now - at) * HIGH)
                for name, (level, at) in self.state.items()
            }
            cost = {"rpm": 1, "tpm": 500}
            if any(levels[name] < cost[name] for name in levels):
                return False
            for name, level in levels.items():
                self.state[name] = (level - cost[name], now)
            return True


def measure(found: dict[str, Case], iterations: int, rounds: int) -> dict[str, list[list[float]]]:
    """Per-call latencies in microseconds, per round, cases interleaved round by round in
    a new order each round (a fixed order measurably favours some positions)."""
    samples: dict[str, list[list[float]]] = {name: [] for name in found}
    per_round = max(1, iterations // rounds)
    for call in found.values():  # warm up: connections, scripts, caches
        for _ in range(min(200, per_round)):
            call()
    clock = time.perf_counter_ns
    order = list(found.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, call in order:
            out = []
            for _ in range(per_round):
                start = clock()
                call()
                out.append((clock() - start) / 1000)
            samples[name].append(out)
    return samples


def summarize(samples: dict[str, list[list[float]]]) -> list[Row]:
    """Median and p99 over all calls; the ratio to the floor is the median of the ratios of
    round medians, a paired comparison that cancels the drift of a busy machine."""
    floor = [statistics.median(r) for r in samples[FLOOR_CASE]]
    rows = []
    for name, rounds in samples.items():
        values = sorted(v for r in rounds for v in r)
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        ratios = [statistics.median(r) / f for r, f in zip(rounds, floor, strict=True)]
        in_memory = "Memory" in name or "memory" in name or "dict" in name
        ratio = "-" if in_memory else f"{statistics.median(ratios):.2f}x"
        rows.append(Row(name, f"{statistics.median(values):.1f}", f"{p99:.1f}", ratio))
    return rows


def paired(samples: dict[str, list[list[float]]]) -> list[str]:
    """The targets' comparisons, each the median of per-round ratios of round medians."""
    lines = []
    for case, reference in PAIRS:
        if case not in samples or reference not in samples:
            continue
        ratios = [
            statistics.median(a) / statistics.median(b)
            for a, b in zip(samples[case], samples[reference], strict=True)
        ]
        lines.append(f"| {case} | {reference} | {statistics.median(ratios):.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent.parent / "docs/benchmarks.md")
    )
    args = parser.parse_args(argv)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    samples = measure(cases(args.redis, namespace), args.iterations, args.rounds)
    samples |= measure(memory_cases(), args.iterations, args.rounds)
    rows = summarize(samples)
    client = redis.Redis.from_url(args.redis)
    for key in client.scan_iter(match=f"*{namespace}*"):
        client.delete(key)
    header = ("case", "median µs", "p99 µs", "median vs floor")
    body = [
        f"{args.iterations} calls per case in {args.rounds} rounds (the Redis cases interleaved "
        "round by round), one process, one connection, limits set high so every call admits, "
        "garbage collector on. The ratio is the median of per-round ratios to the floor.",
        "",
        *machine(client),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "Paired comparisons (median of the per-round ratios):",
        "",
        "| case | against | ratio |",
        "|---|---|---|",
        *paired(samples),
    ]
    write_section(args.output, "acquire latency", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
