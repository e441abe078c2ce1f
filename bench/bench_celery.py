"""End to end through real Celery workers: what throttling costs, and churn under overload.

    python -m bench.bench_celery --redis redis://127.0.0.1:6379/9

1. Throughput: one worker node (prefork, 2 processes) empties a queue of no-op tasks,
   throttled (limits set high, so nothing is refused) and unthrottled, in alternating
   rounds; the median of each.
2. Overload: tasks offered at 4x a fleet-wide limit to two worker nodes: completion
   time, the rate reached, and deliveries per task; beside it, Celery's own rate_limit
   with the same figure (which counts per node).
Writes its section of docs/benchmarks.md (``--output -`` prints only).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench._report import machine, write_section

ROOT = Path(__file__).parent.parent


class Workers:
    """Worker nodes in subprocesses, with an environment of their own."""

    def __init__(self, env: dict[str, str], nodes: int) -> None:
        self.procs = []
        for i in range(nodes):
            cmd = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "worker",
                "-Q",
                env["BENCH_NS"],
                "-c",
                "2",
                "-n",
                f"bench{i}-{env['BENCH_NS']}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "warning",
            ]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=60)


def app_module(env: dict[str, str]) -> Any:
    os.environ.update(env)
    import bench.celery_app as module

    return module


def run(task: Any, count: int, offered_rate: float | None = None) -> float:
    """Send ``count`` calls (at ``offered_rate`` per second, or at once); seconds until all
    results are in."""
    start = time.perf_counter()
    results = []
    for i in range(count):
        if offered_rate:
            time.sleep(max(0.0, start + i / offered_rate - time.perf_counter()))
        results.append(task.delay(i))
    for result in results:
        result.get(timeout=600)
    return time.perf_counter() - start


def timed_round(env: dict[str, str], task_name: str, tasks: int) -> float:
    """Tasks per second of one worker node emptying a queue of ``tasks`` no-op calls.

    The queue is filled before the worker starts, and the workers time themselves (first
    task begun to last task ended), so neither publishing nor start-up is counted.
    """
    module = app_module(env)
    client = redis.Redis.from_url(env["BENCH_REDIS"])
    progress = f"{env['BENCH_NS']}:progress"
    client.delete(progress)
    task = getattr(module, task_name)
    with module.app.producer_or_acquire() as producer:
        for i in range(tasks):
            task.apply_async((i,), ignore_result=True, producer=producer)
    workers = Workers(env, nodes=1)
    try:
        deadline = time.monotonic() + 300
        while True:
            reports = [v.split() for v in client.hgetall(progress).values()]
            if sum(int(r[0]) for r in reports) >= tasks:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task_name}: {reports} after 300 s")
            time.sleep(0.05)
    finally:
        workers.stop()
    first = min(float(r[1]) for r in reports)
    last = max(float(r[2]) for r in reports)
    return tasks / (last - first)


def throughput(env: dict[str, str], tasks: int, rounds: int) -> list[str]:
    env = {**env, "BENCH_PROGRESS": "1"}
    plain: list[float] = []
    limited: list[float] = []
    for i in range(rounds):  # which goes first alternates, so drift hits both alike
        order = [("plain", plain), ("limited", limited)]
        for name, rates in order if i % 2 == 0 else reversed(order):
            rates.append(timed_round(env, name, tasks))
    plain_rate, limited_rate = statistics.median(plain), statistics.median(limited)
    cost = 1 - limited_rate / plain_rate
    return [
        "| run | tasks/s (median) | rounds |",
        "|---|---|---|",
        f"| unthrottled no-op tasks | {plain_rate:.0f} | {_rates(plain)} |",
        f"| throttled no-op tasks (nothing refused) | {limited_rate:.0f} | {_rates(limited)} |",
        "",
        f"Throttling costs **{cost:.1%}** of throughput ({rounds} rounds of {tasks} tasks "
        "each, in alternating order; one node of 2 prefork processes empties a queue filled "
        "before it starts, timed from its first task begun to its last ended; Redis broker "
        "and store, results ignored).",
    ]


def _rates(rates: list[float]) -> str:
    return " ".join(f"{rate:.0f}" for rate in rates)


def overload(env: dict[str, str], rate: float, tasks: int) -> list[str]:
    rows = [
        "| limit | tasks | offered | took s | rate reached /s | deliveries per task |",
        "|---|---|---|---|---|---|",
    ]
    client = redis.Redis.from_url(env["BENCH_REDIS"])
    env = {**env, "BENCH_RATE": str(rate), "BENCH_COUNT": "1"}
    workers = Workers(env, nodes=2)
    try:
        module = app_module(env)
        import importlib

        module = importlib.reload(module)
        for name, task in (
            ("taskthrottle", module.limited),
            ("Celery rate_limit", module.celery_rate_limited),
        ):
            client.delete(f"{env['BENCH_NS']}:deliveries")
            took = run(task, tasks, offered_rate=4 * rate)
            counted: Any = client.get(f"{env['BENCH_NS']}:deliveries")
            deliveries = int(counted or 0)
            rows.append(
                f"| {name} {rate:g}/s | {tasks} | {4 * rate:g}/s | {took:.1f} | "
                f"{tasks / took:.1f} | {deliveries / tasks:.2f} |"
            )
    finally:
        workers.stop()
    rows += [
        "",
        "Two worker nodes of 2 prefork processes each. Celery's rate_limit counts per "
        "node, so two nodes run it at up to twice the figure.",
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--overload-tasks", type=int, default=400)
    parser.add_argument("--output", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args(argv)
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BENCH_REDIS": args.redis, "BENCH_NS": ns}
    client = redis.Redis.from_url(args.redis)
    try:
        body = [
            *machine(client),
            "",
            "### Throughput",
            "",
            *throughput(env, args.tasks, args.rounds),
            "",
            "### Churn under 4x overload",
            "",
            *overload(env, args.rate, args.overload_tasks),
        ]
    finally:
        for key in client.scan_iter(match=f"*{ns}*", count=1000):
            client.delete(key)
    write_section(args.output, "celery end to end", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
