"""A fast run of each benchmark script, so that none of them rots."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_acquire_benchmark_runs(redis_url: str, tmp_path: Path) -> None:
    """bench.bench_acquire measures every case and writes its section."""
    output = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_acquire",
            "--redis",
            redis_url,
            "--iterations",
            "60",
            "--rounds",
            "2",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = output.read_text()
    for case in ("floor: bare EVALSHA", "RedisStore acquire, 2 limits", "MemoryStore acquire"):
        assert case in text
    assert "redis-server" in text


def test_celery_benchmark_runs(redis_url: str, tmp_path: Path) -> None:
    """bench.bench_celery runs its throughput and overload cases end to end."""
    output = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_celery",
            "--redis",
            redis_url,
            "--tasks",
            "40",
            "--rounds",
            "2",
            "--rate",
            "20",
            "--overload-tasks",
            "20",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    text = output.read_text()
    assert re.search(r"Throttling costs \*\*-?[\d.]+%\*\*", text), text
    for case in ("unthrottled no-op tasks", r"throttled no-op tasks \(nothing refused\)"):
        assert re.search(rf"\| {case} \| \d+ \| \d+ \d+ \|", text), text
    row = re.search(r"\| taskthrottle 20/s \| 20 \| 80/s \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", text)
    assert row is not None, text
    assert float(row[1]) >= 1.0  # the overload run counts every delivery


def test_dramatiq_benchmark_runs(redis_url: str, tmp_path: Path) -> None:
    """bench.bench_dramatiq runs both limiters on real workers and writes its table."""
    output = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_dramatiq",
            "--redis",
            redis_url,
            "--messages",
            "10",
            "--deadline",
            "30",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    text = output.read_text()
    assert "| taskthrottle ThrottleMiddleware | 10 | 10 |" in text
    assert "dramatiq BucketRateLimiter + Retries" in text
