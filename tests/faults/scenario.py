"""One fault scenario's run: a fleet, the test's client of its framework, the servers it
uses; send tasks, wait (by polling, with deadlines) for them to end and the queues to
drain, then check everything checks.py knows."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults import checks
from tests.faults.drivers import Driver
from tests.faults.fleet import Fleet, Worker
from tests.faults.servers import RedisServer
from tests.faults.waiting import poll

#: Seconds every sent task has to end in, faults included.
END_DEADLINE = 60.0
#: Seconds the broker and the store get to hand back every message they hold, afterwards.
DRAIN_DEADLINE = 20.0


@dataclass
class Run:
    driver: Driver
    fleet: Fleet
    broker: RedisServer
    store: RedisServer
    keys: list[str] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)
    #: Whether the workers noticed the last `outage` (None: no outage).
    noticed: bool | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def journal(self) -> Path:
        return Path(self.fleet.env["TT_JOURNAL"])

    @property
    def ns(self) -> str:
        return self.fleet.env["TT_NS"]

    def start(self, nodes: int = 1) -> list[Worker]:
        return self.driver.start(self.fleet, nodes)

    def send(self, task: str, count: int, *args: float) -> list[str]:
        """Send ``count`` tasks keyed ``<task>-<n>``; their keys."""
        keys = [f"{task}-{len(self.keys) + i:03d}" for i in range(count)]
        for key in keys:
            self.driver.send(task, key, *args)
        self.keys += keys
        self.started = time.monotonic()
        return keys

    def events(self) -> list[checks.Event]:
        return checks.read_journal(self.journal)

    def starts(self) -> int:
        return sum(1 for e in self.events() if e.kind == "start")

    def wait_for(self, check: Callable[[], bool], seconds: float, what: str) -> None:
        """Poll ``check`` (a step of the scenario, before its fault) with a deadline."""
        if not poll(check, seconds, every=0.05):
            raise AssertionError(f"scenario step timed out after {seconds:g}s: {what}")

    def log_lines(self, pattern: str) -> int:
        """How many worker log lines match ``pattern`` (a regular expression)."""
        found = re.compile(pattern)
        logs = self.fleet.logs_text().values()
        return sum(1 for text in logs for line in text.splitlines() if found.search(line))

    def outage(self, seconds: float, noticed: str) -> None:
        """Keep a fault in place for ``seconds``, and on until a worker logs a line matching
        ``noticed`` (deadline: 10 s more); a fault no worker noticed tested nothing."""
        before = self.log_lines(noticed)
        until = time.monotonic() + seconds
        held = poll(
            lambda: time.monotonic() >= until and self.log_lines(noticed) > before,
            seconds + 10,
            every=0.1,
        )
        self.noticed = held

    def kill(self, worker: Worker) -> None:
        """SIGKILL a node; its bodies count as ended at this moment for the overlap check."""
        when = time.time()
        for pid in self.fleet.kill(worker):
            self.kills[pid] = when

    def finish(self) -> dict[str, float]:
        """Wait until every task ended (or nothing is left anywhere that could still run:
        the broker and the store hold nothing and the journal has been still for 3 s), then
        until the broker and the store are drained and the journal is still. Returns the
        seconds each phase took since the tasks were sent, and deliveries per task."""
        quiet = self._still(3.0)
        poll(
            lambda: (
                checks.ended(self.events(), self.keys)
                or (self._drained() and quiet())
                or bool(self.died())
            ),
            END_DEADLINE,
            every=0.2,
        )
        took = {"ended": round(time.monotonic() - self.started, 1)}
        if checks.ended(self.events(), self.keys):
            poll(self._drained, DRAIN_DEADLINE, every=0.2)
            poll(self._still(1.0), 5.0, every=0.2)
        else:  # the checks say what is missing; the logs will say where workers are stuck
            booted = (e.pid for e in self.events() if e.kind == "boot")
            self.fleet.dump_stacks(booted, self.journal)
            print(f"tasks missing: stacks of the live workers in {self.journal}/*.stacks")
        took["drained"] = round(time.monotonic() - self.started, 1)
        deliveries = sum(1 for e in self.events() if e.kind == "deliver")
        took["deliveries per task"] = round(deliveries / max(len(self.keys), 1), 2)
        return took

    def died(self) -> list[str]:
        """Nodes that exited though the test did not kill them."""
        killed = set(self.kills)
        return [w.name for w in self.fleet.workers if not w.alive() and w.proc.pid not in killed]

    def _check_alive(self) -> None:
        if self.died():
            raise AssertionError(f"worker nodes exited on their own: {self.died()}")

    def _check_noticed(self) -> None:
        if not self.noticed:
            raise AssertionError("no worker logged the fault: the scenario tested nothing")

    def _drained(self) -> bool:
        """Nothing queued, delayed, unacknowledged or parked (parking lives in the broker's
        Redis or beside the store, depending on the version: both are counted)."""
        try:
            with self.broker.client(timeout=0.5) as broker, self.store.client(timeout=0.5) as st:
                parked = sum(self._parked(client) for client in {broker, st})
                return self.driver.in_flight(broker) + parked == 0
        except (redis.RedisError, OSError):  # a server is down: not drained yet
            return False

    def _parked(self, client: redis.Redis) -> int:
        """Tasks parked or claimed for release: the members of ``{ns}:park:...due`` and
        ``...claimed`` (``{ns}:park:due``, or per app ``{ns}:park:<app>:due``)."""
        total = 0
        for raw in client.scan_iter(match=f"{{{self.ns}}}:park:*", count=1000):
            if raw.endswith((b"due", b"claimed")):
                found: Any = client.zcard(raw)
                total += int(found)
        return total

    def _still(self, seconds: float) -> Callable[[], bool]:
        """True once the journal has not grown for ``seconds``."""
        last = {"size": -1, "since": time.monotonic()}

        def check() -> bool:
            size = sum(p.stat().st_size for p in self.journal.glob("*.log"))
            if size != last["size"]:
                last.update(size=size, since=time.monotonic())
            return time.monotonic() - last["since"] >= seconds

        return check

    def verify(
        self,
        cap: int | None = None,
        killed_mid_body: Collection[str] = (),
        known_crashes: Mapping[str, str] | None = None,
    ) -> None:
        """Every check of checks.py over this run; ``cap``: the slots of ``guarded``.

        ``known_crashes`` maps the reason of a crash outside taskthrottle to a regular
        expression over the worker logs: when one matches, the test is marked xfail with
        that reason and the outcome of every check, instead of failing."""
        events, logs = self.events(), self.fleet.logs_text()
        with self.broker.client() as broker, self.store.client() as store:
            dead, held = self.driver.dead_letters(broker), self.driver.held(broker)
            suite: dict[str, Callable[[], None]] = {
                "none lost": lambda: checks.check_none_lost(events, self.keys, held),
                "none twice": lambda: checks.check_none_twice(events, self.keys, killed_mid_body),
                "store TTLs": lambda: checks.check_ttls(store, self.ns),
                "broker TTLs": lambda: checks.check_ttls(broker, self.ns),
                "no failures": lambda: checks.check_no_failures(events, logs, dead),
                "workers alive": self._check_alive,
            }
            if self.noticed is not None:
                suite["fault noticed"] = self._check_noticed
            if cap is not None:
                guarded = {k for k in self.keys if k.startswith("guarded-")}
                suite["overlap"] = lambda: checks.check_overlap(events, guarded, cap, self.kills)
            try:
                checks.verify(suite)
            except AssertionError as failed:
                crash = self._known_crash(known_crashes or {})
                if crash is None and known_crashes and checks.lost_in_transport(str(failed)):
                    crash = "the broker's transport lost tasks no worker ever received"
                if crash is None and self.kills and self._copies_lost_by_kill(str(failed), logs):
                    crash = (
                        "kombu's Redis transport lost a copy that the SIGKILLed node had "
                        "popped and not yet recorded as unacknowledged"
                    )
                if crash:
                    pytest.xfail(f"{crash}; the checks said:\n{failed}")
                raise

    @staticmethod
    def _copies_lost_by_kill(failures: str, logs: Mapping[str, str]) -> bool:
        """Whether the only failure is tasks lost in flight: each of their deliveries handed a
        copy back to the broker ("sent back" in a worker's log), and the last copy reached
        no worker, nor is it in the broker. A copy is the broker's once published; a node
        SIGKILLed between kombu's BRPOP and its record of the message loses it."""
        lines = failures.splitlines()
        if len(lines) != 1 or not lines[0].startswith("[none lost]") or "more" in lines[0]:
            return False
        lost = re.findall(r"(\S+) \((\d+) deliveries; not in the broker\)", lines[0])
        if not lost or len(lost) != lines[0].count("deliveries;"):
            return False
        text = "\n".join(logs.values())
        return all(
            int(n) > 0 and len(re.findall(rf"\[{re.escape(key)}\] sent back for", text)) == int(n)
            for key, n in lost
        )

    def _known_crash(self, known: Mapping[str, str]) -> str | None:
        logs = "\n".join(self.fleet.logs_text().values())
        return next((why for why, found in known.items() if re.search(found, logs)), None)
