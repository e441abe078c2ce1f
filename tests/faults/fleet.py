"""Real worker processes of one test: started in process groups of their own, so that a
node (main process and pool children) can be killed whole, and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.config import DUMP_STACKS
from tests.faults.waiting import poll

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a worker gets to start, and to stop after SIGTERM before it is killed.
START_DEADLINE = 60.0
STOP_DEADLINE = 10.0


@dataclass
class Worker:
    """One node: a Celery worker (main process and prefork pool) or a dramatiq command
    (main process and worker processes), leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_marker: bytes
    ready_count: int

    def ready(self) -> bool:
        return self.log.read_bytes().count(self.ready_marker) >= self.ready_count

    def alive(self) -> bool:
        return self.proc.poll() is None

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this node's group."""
        try:
            return os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def pids(self) -> set[int]:
        """The live processes of this node's group."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.proc.pid:  # the process group id
                found.add(int(stat.parent.name))
        return found

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    """The workers of one test and the environment they share (one queue, one namespace)."""

    env: dict[str, str]
    logs: Path
    workers: list[Worker] = field(default_factory=list)

    def celery(self, count: int = 1, concurrency: int = 2) -> list[Worker]:
        """Start ``count`` Celery nodes of ``concurrency`` prefork processes; wait for them."""
        started = []
        for _ in range(count):
            name = f"celery{len(self.workers) + 1}"
            cmd = ["-m", "celery", "-A", "tests.faults.celery_app", "worker"]
            cmd += ["-Q", self.env["TT_QUEUE"], "-c", str(concurrency), "-P", "prefork"]
            cmd += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle"]
            cmd += ["--without-heartbeat", "-l", "info"]
            started.append(self._spawn(name, cmd, b" ready.", 1))
        return self._wait_ready(started)

    def dramatiq(self, count: int = 1, processes: int = 1, threads: int = 2) -> list[Worker]:
        """Start ``count`` dramatiq commands of ``processes`` x ``threads``; wait for them."""
        started = []
        for _ in range(count):
            name = f"dramatiq{len(self.workers) + 1}"
            cmd = ["-m", "dramatiq", "tests.faults.dramatiq_app:setup"]
            cmd += ["--processes", str(processes), "--threads", str(threads)]
            cmd += ["--queues", self.env["TT_QUEUE"], "--worker-shutdown-timeout", "5000"]
            started.append(self._spawn(name, cmd, b"ready for action", processes))
        return self._wait_ready(started)

    def _spawn(self, name: str, args: list[str], marker: bytes, count: int) -> Worker:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name, proc, log, marker, count)
        self.workers.append(worker)
        return worker

    def _wait_ready(self, workers: list[Worker]) -> list[Worker]:
        def all_ready() -> bool:
            dead = [w for w in workers if not w.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_text()[-3000:]}")
            return all(w.ready() for w in workers)

        if not poll(all_ready, START_DEADLINE, every=0.1):
            late = [w.name for w in workers if not w.ready()]
            raise RuntimeError(f"workers {late} not ready after {START_DEADLINE:g}s")
        return workers

    def owner_of(self, pid: int) -> Worker:
        """The node whose process group ``pid`` belongs to."""
        for worker in self.workers:
            if worker.alive() and worker.owns(pid):
                return worker
        raise LookupError(f"no live worker of this fleet has process {pid}")

    def kill(self, worker: Worker) -> set[int]:
        """SIGKILL the whole node, main process and children, at once; the pids killed."""
        pids = worker.pids()
        worker.signal_group(signal.SIGKILL)
        worker.proc.wait(timeout=STOP_DEADLINE)
        return pids

    def dump_stacks(self, pids: Iterable[int], into: Path) -> None:
        """Have the live worker processes among ``pids`` (those that installed the dump)
        write their threads' stacks into ``into/<pid>.stacks``."""
        signalled = {pid for w in self.workers for pid in set(pids) & w.pids()}
        for pid in signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, DUMP_STACKS)

        def written() -> bool:
            files = [into / f"{pid}.stacks" for pid in signalled]
            return all(f.exists() and f.stat().st_size > 0 for f in files)

        poll(written, 3, every=0.1)

    def logs_text(self) -> dict[str, str]:
        return {w.name: w.log_text() for w in self.workers}

    def stop(self) -> None:
        """SIGTERM each node's main process; SIGKILL the group of any still there after
        the deadline (and of every node, for children that outlived their parent)."""
        for worker in self.workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        poll(lambda: not any(w.alive() for w in self.workers), STOP_DEADLINE, every=0.1)
        for worker in self.workers:
            worker.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=STOP_DEADLINE)
