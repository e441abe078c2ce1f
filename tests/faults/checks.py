"""What every fault scenario must hold at the end: read the journal, the store, the broker
and the worker logs. Each check raises AssertionError naming the offending keys; `verify`
runs them all and reports every one that failed."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import redis


class Event(NamedTuple):
    kind: str
    key: str
    pid: int
    time: float
    extra: str


def read_journal(directory: Path) -> list[Event]:
    """Every line of every worker process's journal file, in time order."""
    events = []
    for path in directory.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            kind, key, pid, when, *extra = line.split(" ", 4)
            events.append(Event(kind, key, int(pid), float(when), " ".join(extra)))
    return sorted(events, key=lambda e: e.time)


def _count(events: Iterable[Event], kind: str) -> Counter[str]:
    return Counter(e.key for e in events if e.kind == kind)


def _listed(keys: Iterable[str], limit: int = 20) -> str:
    found = sorted(keys)
    more = f" ... and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more


def ended(events: Iterable[Event], keys: Collection[str]) -> bool:
    """Whether every key has ended at least once."""
    return set(keys) <= set(_count(events, "end"))


def check_none_lost(
    events: list[Event], keys: Collection[str], held: Mapping[str, str] | None = None
) -> None:
    """Every sent key has exactly one ``end``. ``held``: where the broker still holds
    tasks (key -> place), to say where the lost ones are stuck."""
    ends = _count(events, "end")
    lost = [k for k in keys if ends[k] == 0]
    if lost:
        delivered = _count(events, "deliver")
        where = [f"{k} ({delivered[k]} deliveries; {_place(k, delivered, held)})" for k in lost]
        raise AssertionError(f"{len(lost)} of {len(keys)} tasks never ended: {_listed(where)}")
    twice = {k: n for k, n in ends.items() if n > 1}
    if twice:
        raise AssertionError(f"{len(twice)} tasks ended more than once: {twice}")


NEVER_RECEIVED = "never processed, and gone from the broker: lost before any worker processed it"


def lost_in_transport(failures: str) -> bool:
    """Whether the only failure is tasks lost before any worker received them: a message
    that kombu's Redis transport popped as its connection died, before it recorded it as
    unacknowledged, is gone, throttled or not (the broker scenarios only)."""
    lines = failures.splitlines()
    if len(lines) != 1 or not lines[0].startswith("[none lost]") or "more" in lines[0]:
        return False
    lost = re.findall(r"\((\d+) deliveries; ([^)]*)\)", lines[0])
    return bool(lost) and all(n == "0" and place == NEVER_RECEIVED for n, place in lost)


def _place(key: str, delivered: Mapping[str, int], held: Mapping[str, str] | None) -> str:
    place = (held or {}).get(key)
    if place:
        return place
    if delivered[key]:
        return "not in the broker"
    return NEVER_RECEIVED


def check_none_twice(
    events: list[Event], keys: Collection[str], killed_mid_body: Collection[str] = ()
) -> None:
    """No key starts more than once, but a body that was killed mid-run may start once more
    (acks_late redelivers it); and nothing starts that was not sent."""
    starts = _count(events, "start")
    allowed = {k: 2 if k in killed_mid_body else 1 for k in keys}
    twice = {k: n for k, n in starts.items() if n > allowed.get(k, 0)}
    if twice:
        raise AssertionError(f"{len(twice)} tasks started too often (key: starts): {twice}")


def check_overlap(
    events: list[Event], keys: Collection[str], cap: int, kills: Mapping[int, float]
) -> None:
    """At no instant do more than ``cap`` bodies of ``keys`` run. A body ends at its
    ``end``, or, if its process was killed (``kills``: pid -> when), at the kill."""
    open_at: dict[tuple[str, int], list[float]] = defaultdict(list)
    spans: list[tuple[float, float, str]] = []
    for e in (e for e in events if e.key in keys):
        if e.kind == "start":
            open_at[e.key, e.pid].append(e.time)
        elif e.kind == "end" and open_at[e.key, e.pid]:
            spans.append((open_at[e.key, e.pid].pop(0), e.time, e.key))
    for (key, pid), starts in open_at.items():
        spans += [(t, kills.get(pid, float("inf")), key) for t in starts]
    worst: list[str] = []
    for begin, _, _ in spans:
        running = [k for b, end, k in spans if b <= begin < end]
        if len(running) > max(cap, len(worst)):
            worst = running
    if worst:
        raise AssertionError(f"{len(worst)} bodies ran at once (cap {cap}): {_listed(worst)}")


def check_ttls(store: redis.Redis, ns: str) -> None:
    """Every taskthrottle key (``{ns}:*``) of a Redis expires (PTTL != -1): the store's, and
    the broker's, where parked tasks and run tokens may live."""
    forever = []
    for raw in store.scan_iter(match=f"{{{ns}}}:*", count=1000):
        ttl: Any = store.pttl(raw)
        if ttl == -1:
            forever.append(raw.decode())
    if forever:
        raise AssertionError(f"{len(forever)} keys never expire: {_listed(forever)}")


#: Log lines that mean a task (or a worker) failed, whichever framework logged them.
FAILURES = re.compile(
    r"raised unexpected|Task handler raised error|Unrecoverable error|WorkerLostError"
    r"|Failed to process message|Unexpected failure in|Retries exceeded|exited unexpectedly"
    r"|Signal handler .* raised"
)
_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d ")


def log_failures(logs: Mapping[str, str]) -> list[str]:
    """The log records (first line, and the last line of a traceback) that say a task or a
    worker failed."""
    found = []
    for name, text in logs.items():
        record: list[str] = []
        for line in [*text.splitlines(), "[0000-00-00 end"]:
            if _RECORD.match(line) and record:
                if FAILURES.search(record[0]):
                    tail = f" <- {record[-1].strip()}" if len(record) > 1 else ""
                    found.append(f"{name}: {record[0][:300]}{tail[:300]}")
                record = []
            record.append(line)
    return found


def check_no_failures(events: list[Event], logs: Mapping[str, str], dead: list[str]) -> None:
    """No delivery failed (journal), none came back as a retry, nothing was dead-lettered,
    and no worker log reports a failed task or a crashed worker."""
    problems = []
    fails = [e for e in events if e.kind == "fail"]
    if fails:
        kinds = Counter(e.extra.split(":")[0] for e in fails)
        keys = {e.key for e in fails}
        problems.append(f"{len(fails)} failed deliveries of {len(keys)} tasks {dict(kinds)}: ")
        problems[-1] += _listed(keys)
    retried = {e.key: e.extra for e in events if e.kind == "retried"}
    if retried:
        problems.append(f"{len(retried)} tasks ran with retries > 0: {retried}")
    if dead:
        problems.append(f"{len(dead)} messages dead-lettered: {_listed(dead)}")
    records = log_failures(logs)
    if records:
        shown = "\n    ".join(records[:8])
        problems.append(f"{len(records)} failure records in worker logs, first:\n    {shown}")
    if problems:
        raise AssertionError("\n  ".join(problems))


def verify(checks: Mapping[str, Callable[[], None]]) -> None:
    """Run every check; fail once, listing each that failed and why."""
    failed = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError as exc:
            failed.append(f"[{name}] {exc}")
    if failed:
        raise AssertionError("\n".join(failed))
