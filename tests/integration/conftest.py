"""Real worker processes for the integration tests: started per test, stopped by it."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).parent.parent.parent
RABBIT = ("127.0.0.1", 5672)


def rabbit_answers() -> bool:
    try:
        with socket.create_connection(RABBIT, timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Fleet:
    """Worker processes of one test, with the environment they share."""

    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, app: str, name: str, *extra: str, concurrency: int = 2) -> None:
        """Start a worker node and wait until it is ready to consume."""
        log = self.logs / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-Q",
            self.env["TT_QUEUE"],
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "-P",
            "prefork",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
            *extra,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def start_dramatiq(self, app: str, name: str, processes: int = 2, threads: int = 2) -> None:
        """Start a dramatiq worker (processes x threads) and wait until every process is ready."""
        log = self.logs / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "dramatiq",
            app,
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            self.env["TT_QUEUE"],
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b"ready for action") < processes:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dramatiq {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def client(self, module: str, monkeypatch: pytest.MonkeyPatch) -> Any:
        """The app ``module`` imported afresh in the test process, with the fleet's settings."""
        for name, value in self.env.items():
            if name.startswith("TT_"):
                monkeypatch.setenv(name, value)
        return importlib.reload(importlib.import_module(module))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Makes a fleet with its own queue and key prefix; stops it and deletes its keys."""
    made: list[Fleet] = []
    client = redis.Redis.from_url(redis_url)

    def make(broker: str | None = None, **env: str) -> Fleet:
        ns = f"tt-{uuid.uuid4().hex[:10]}"
        full = {**os.environ, "TT_REDIS": redis_url, "TT_NS": ns, "TT_QUEUE": ns, **env}
        if broker:
            full["TT_BROKER"] = broker
        made.append(Fleet(full, tmp_path))
        return made[-1]

    yield make
    for fleet in made:
        fleet.stop()
        for key in client.scan_iter(match=f"*{fleet.env['TT_NS']}*", count=1000):
            client.delete(key)
