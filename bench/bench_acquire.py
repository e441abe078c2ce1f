"""Acquire latency: taskthrottle against the floor (a bare EVALSHA) and a peer, in one run.

    python bench/bench_acquire.py --redis redis://127.0.0.1:6379/0 --iterations 20000

Cases run interleaved in rounds, so that drift on a busy machine hits all alike.
Writes its section of docs/benchmarks.md (``--output``; ``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from bench._report import Row, machine, write_section
from taskthrottle import Limit, Limiter, MemoryStore, RedisStore

#: The floor: the least a 2-key token bucket in one Lua call can do.
FLOOR_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap, rate, ok, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), 1, {}
for i = 1, 2 do
  local v = redis.call('HMGET', KEYS[i], 't', 'a')
  local at = tonumber(v[2]) or now
  tokens[i] = math.min(cap, (tonumber(v[1]) or cap) + (now - at) * rate)
  if tokens[i] < 1 then ok = 0 end
end
if ok == 1 then
  for i = 1, 2 do
    redis.call('HSET', KEYS[i], 't', tokens[i] - 1, 'a', now)
    redis.call('PEXPIRE', KEYS[i], 60000)
  end
end
return ok
"""

Case = Callable[[], object]
FLOOR_CASE = "floor: bare EVALSHA, 2-key token bucket"


def cases(url: str, namespace: str) -> dict[str, Case]:
    """Every measured call, each admitting (limits set high so nothing is refused)."""
    client = redis.Redis.from_url(url)
    floor_sha = str(client.script_load(FLOOR_LUA))
    keys = (f"{{{namespace}}}:floor:a", f"{{{namespace}}}:floor:b")
    rpm = Limit.per_second("rpm", 1_000_000)
    tpm = Limit.per_second("tpm", 1_000_000)
    on_redis = Limiter(RedisStore.from_url(url, namespace=namespace))
    found: dict[str, Case] = {
        "redis PING (a bare round trip)": client.ping,
        FLOOR_CASE: lambda: client.evalsha(floor_sha, 2, *keys, 1_000_000, 1000),
        "RedisStore acquire, 1 limit": lambda: on_redis.acquire("tenant:1", [rpm]),
        "RedisStore acquire, 2 limits": lambda: on_redis.acquire("tenant:1", [rpm, tpm]),
    }
    found.update(peer_cases(url, namespace))
    return found


def peer_cases(url: str, namespace: str) -> dict[str, Case]:
    """The `limits` library on the same Redis, when installed: two limits are two calls."""
    try:
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
    except ImportError:
        return {}
    storage = RedisStorage(url, key_prefix=f"{namespace}-limits")
    high = RateLimitItemPerSecond(1_000_000)
    fixed, moving = FixedWindowRateLimiter(storage), MovingWindowRateLimiter(storage)

    def two(limiter: FixedWindowRateLimiter | MovingWindowRateLimiter, key: str) -> Case:
        return lambda: limiter.hit(high, key, "rpm") and limiter.hit(high, key, "tpm")

    return {
        "peer: limits fixed window, 2 limits (2 calls)": two(fixed, "fixed"),
        "peer: limits moving window, 2 limits (2 calls)": two(moving, "moving"),
    }


def memory_case() -> dict[str, Case]:
    """The embedded store, measured on its own: interleaving it with network calls would
    measure cold caches instead."""
    rpm = Limit.per_second("rpm", 1_000_000)
    tpm = Limit.per_second("tpm", 1_000_000)
    in_memory = Limiter(MemoryStore())
    return {"MemoryStore acquire, 2 limits": lambda: in_memory.acquire("tenant:1", [rpm, tpm])}


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
        ratio = "-" if "Memory" in name else f"{statistics.median(ratios):.2f}x"
        rows.append(Row(name, f"{statistics.median(values):.1f}", f"{p99:.1f}", ratio))
    return rows


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
    samples |= measure(memory_case(), args.iterations, args.rounds)
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
    ]
    write_section(args.output, "acquire latency", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
