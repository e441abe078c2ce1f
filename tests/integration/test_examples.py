"""The Celery example runs as its README says: a worker, and a push of work."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from tests.integration.conftest import ROOT, Fleet


def test_celery_llm_example(fleet: Callable[..., Fleet]) -> None:
    """Six summaries for three tenants all complete and report their tokens."""
    workers = fleet()
    workers.start("examples.celery_llm.app", "example")
    out = subprocess.run(
        [sys.executable, "-m", "examples.celery_llm.push", "6"],
        cwd=ROOT,
        env=workers.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    lines = [line for line in out.splitlines() if line.rstrip().endswith("tokens")]
    assert len(lines) == 6
    assert {line.split()[1] for line in lines} == {"acme", "globex", "initech"}
    assert "a call now would wait 0.00s" in out


def test_dramatiq_llm_example(fleet: Callable[..., Fleet]) -> None:
    """Six summaries for three tenants all complete and report their tokens."""
    workers = fleet()
    workers.start_dramatiq("examples.dramatiq_llm.app", "example", processes=1)
    out = subprocess.run(
        [sys.executable, "-m", "examples.dramatiq_llm.push", "6"],
        cwd=ROOT,
        env=workers.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    lines = [line for line in out.splitlines() if line.rstrip().endswith("tokens")]
    assert len(lines) == 6
    assert {line.split()[1] for line in lines} == {"acme", "globex", "initech"}
