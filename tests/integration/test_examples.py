"""Each example runs as its README says, with the README's own numbers: its worker command,
and a push of as many tasks as the README pushes."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

from tests.integration.conftest import ROOT, Fleet

EXAMPLES = ROOT / "examples"


def readme_numbers(example: str, pattern: str) -> list[int]:
    """The numbers ``pattern`` captures in the example README's shell block."""
    readme = (EXAMPLES / example / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None, f"{example}/README.md has no sh block"
    found = re.search(pattern, block.group(1))
    assert found is not None, f"{example}/README.md: no {pattern!r} in {block.group(1)!r}"
    return [int(number) for number in found.groups()]


def push(example: str, fleet: Fleet) -> list[str]:
    """Runs the README's push command; the lines reporting a finished summary."""
    (count,) = readme_numbers(example, rf"-m examples\.{example}\.push (\d+)")
    out = subprocess.run(
        [sys.executable, "-m", f"examples.{example}.push", str(count)],
        cwd=ROOT,
        env=fleet.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert f"in keys named *{fleet.env['TT_NS']}*" in out  # it says where it writes
    lines = [line for line in out.splitlines() if line.rstrip().endswith("tokens")]
    assert len(lines) == count
    assert Counter(line.split()[1] for line in lines) == Counter(
        ("acme", "globex", "initech")[i % 3] for i in range(count)
    )
    return lines


def assert_deferrals_logged(log: str) -> None:
    """The README's burst outruns the tenants' tpm: the worker logs deferrals at INFO,
    naming the tenant's key and limit, never the task's arguments."""
    ours = [line for line in log.splitlines() if "taskthrottle:" in line]
    waits = re.findall(r"(?:sent back|parked) for [\d.]+ s: waits for (.*)", "\n".join(ours))
    assert waits, log[-3000:]
    assert all(re.search(r"tenant:(acme|globex|initech)/tpm", why) for why in waits), waits
    assert not [line for line in ours if "quick brown fox" in line]


def test_celery_llm_example(fleet: Callable[..., Fleet]) -> None:
    """A worker of the README's concurrency runs the README's push to the end."""
    (concurrency,) = readme_numbers("celery_llm", r"worker -c (\d+)")
    workers = fleet()
    workers.start("examples.celery_llm.app", "example", concurrency=concurrency)
    push("celery_llm", workers)
    assert_deferrals_logged((workers.logs / "example.log").read_text())


def test_dramatiq_llm_example(fleet: Callable[..., Fleet]) -> None:
    """A worker of the README's processes and threads runs the README's push to the end."""
    processes, threads = readme_numbers("dramatiq_llm", r"--processes (\d+) --threads (\d+)")
    workers = fleet()
    workers.start_dramatiq("examples.dramatiq_llm.app", "example", processes, threads)
    push("dramatiq_llm", workers)
    assert_deferrals_logged((workers.logs / "example.log").read_text())
