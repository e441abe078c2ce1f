"""End to end through real Celery workers: what throttling costs, and churn under overload.

    python -m bench.bench_celery --redis redis://127.0.0.1:6379/9 --tasks 3000

1. Throughput: no-op tasks through one worker node (prefork, 2 processes), throttled
   (limits set high, so nothing is refused) against the same tasks unthrottled, in
   alternating rounds.
2. Overload: tasks offered at 4x a fleet-wide limit to two worker nodes: completion
   time, the rate reached, and deliveries per task; beside it, Celery's own rate_limit
   with the same figure (which counts per node).
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


def throughput(env: dict[str, str], tasks: int, rounds: int) -> list[str]:
    workers = Workers(env, nodes=1)
    try:
        module = app_module(env)
        run(module.plain, 50)  # warm up: workers ready, connections open
        run(module.limited, 50)
        plain, limited = 0.0, 0.0
        for _ in range(rounds):
            plain += run(module.plain, tasks // rounds)
            limited += run(module.limited, tasks // rounds)
    finally:
        workers.stop()
    cost = (limited - plain) / plain
    return [
        "| run | tasks/s |",
        "|---|---|",
        f"| unthrottled no-op tasks | {tasks / plain:.0f} |",
        f"| throttled no-op tasks (nothing refused) | {tasks / limited:.0f} |",
        "",
        f"Throttling costs **{cost:.1%}** of throughput ({tasks} tasks each, {rounds} "
        "alternating rounds, one node of 2 prefork processes, Redis broker and store).",
    ]


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
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=6)
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
