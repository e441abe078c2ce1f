"""A fast run of each benchmark script, so that none of them rots."""

from __future__ import annotations

import importlib.util
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
    for case in (
        "floor: bare EVALSHA",
        "RedisStore acquire, 2 limits, consume given",
        "MemoryStore acquire",
        "Paired comparisons",
    ):
        assert case in text
    if importlib.util.find_spec("limits") is not None:  # the peers come with [bench]
        for case in (
            "RedisStore acquire, fixed window, 1 limit | peer: limits fixed window, 1 limit",
            "RedisStore acquire, sliding window, 1 limit | peer: limits sliding window counter",
            "MemoryStore acquire, sliding window, 1 limit | peer: limits moving window in memory",
        ):
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


def test_hammer_benchmark_runs(redis_url: str, tmp_path: Path) -> None:
    """bench.bench_hammer runs every contender and writes its section."""
    output = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_hammer",
            "--redis",
            redis_url,
            "--processes",
            "2",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = output.read_text()
    for case in ("| taskthrottle |", "| floor: bare EVALSHA"):
        assert case in text
    rows = re.findall(r"^\| taskthrottle \| ([\d,]+) \| ([\d,]+) \|$", text, re.M)
    assert rows and int(rows[0][0].replace(",", "")) > 0


def test_pushback_benchmark_runs(redis_url: str, tmp_path: Path) -> None:
    """bench.bench_pushback runs with and without pushback and writes its table; with
    pushback the provider answers fewer 429s (the figures themselves are the script's)."""
    output = tmp_path / "benchmarks.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_pushback",
            "--redis",
            redis_url,
            "--rate",
            "40",
            "--jobs",
            "100",
            "--threads",
            "16",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = output.read_text()
    rows = dict(
        re.findall(r"^\| (with(?:out)? pushback)[^|]* \| 100 \| \d+ \| (\d+) \|", text, re.M)
    )
    assert set(rows) == {"with pushback", "without pushback"}, text
    assert int(rows["with pushback"]) < int(rows["without pushback"])
