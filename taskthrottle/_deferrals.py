"""Where tasks wait for a distant turn, and which copy of a deferred task may run.

A task whose turn is far away is *parked* (ordered by due time) instead of sitting in
a worker's memory as an ETA message; a releaser claims it shortly before its turn and
publishes it again. Every copy carries a token, and a run key per task says which copy
may run, so that a redelivered original or a copy published twice is dropped, while a
copy redelivered after a crash (``acks_late``) runs again. Brokers know nothing of this
module, nor does it know any broker.
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple, Protocol

#: Seconds a run key lives: longer than any deferral, so stale copies are recognised.
RUN_KEY_TTL = 86_400
#: How many parked tasks one claim takes at most.
BATCH = 200
#: Seconds a claim holds its tasks before another releaser may take them over.
HOLD = 30.0


class Parked(NamedTuple):
    """A claimed task: its id, seconds until its turn, and the payload it was parked with."""

    task_id: str
    due_in: float
    payload: bytes


class Deferrals(Protocol):
    """Parking and run tokens, as the task-queue integrations use them."""

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """Keep ``payload`` until ``due_in`` seconds from now; the original copy is now stale."""
        ...

    def claim(self, lead: float, batch: int, hold: float) -> list[Parked]:
        """Tasks due within ``lead`` seconds (and claims older than ``hold`` seconds)."""
        ...

    def done(self, task_id: str) -> None:
        """Forget a parked task once its copy is published."""
        ...

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """Let the copy carrying ``token`` run; False if an earlier copy already ran, unless
        that is ``prior``, the delivery that is handing itself back again."""
        ...

    def begin(self, task_id: str, token: str | None) -> bool:
        """May this delivery (a copy with ``token``, or the original) run?"""
        ...


class RedisDeferrals:
    """Deferrals in Redis, next to a `RedisStore`'s keys (same hash tag)."""

    _source = resources.files("taskthrottle").joinpath("lua/deferrals.lua").read_text()

    def __init__(self, client: Any, tag: str, clock: Callable[[], float] | None = None) -> None:
        self.client = client
        self.tag = tag
        self.clock = clock
        self._script = client.register_script(self._source)
        self._park = [f"{tag}:park:due", f"{tag}:park:claimed", f"{tag}:park:items"]

    def _call(self, op: str, task_id: str | None, *args: Any) -> Any:
        keys = [*self._park, f"{self.tag}:run:{task_id or ''}"]
        now = "" if self.clock is None else str(round(self.clock() * 1000))
        return self._script(keys=keys, args=[now, op, *args])

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """See `Deferrals.park`."""
        self._call("park", task_id, task_id, round(due_in * 1000), RUN_KEY_TTL, payload)

    def claim(self, lead: float, batch: int, hold: float) -> list[Parked]:
        """See `Deferrals.claim`."""
        reply = self._call("claim", None, round(lead * 1000), batch, round(hold * 1000))
        return [
            Parked(reply[i].decode(), int(reply[i + 1]) / 1000, reply[i + 2])
            for i in range(0, len(reply), 3)
        ]

    def done(self, task_id: str) -> None:
        """See `Deferrals.done`."""
        self._call("done", None, task_id)

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """See `Deferrals.expect`."""
        return bool(self._call("expect", task_id, task_id, token, RUN_KEY_TTL, prior or ""))

    def begin(self, task_id: str, token: str | None) -> bool:
        """See `Deferrals.begin`."""
        return bool(self._call("begin", task_id, task_id, token or ""))


class MemoryDeferrals:
    """Deferrals in this process's memory, for a `MemoryStore` (one process, tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._due: list[tuple[float, str]] = []
        self._items: dict[str, tuple[float, bytes]] = {}
        self._claimed: dict[str, float] = {}
        self._run: dict[str, str] = {}

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """See `Deferrals.park`."""
        with self._lock:
            due = self.clock() + due_in
            heapq.heappush(self._due, (due, task_id))
            self._items[task_id] = (due, payload)
            self._run[task_id] = "parked"

    def claim(self, lead: float, batch: int, hold: float) -> list[Parked]:
        """See `Deferrals.claim`."""
        with self._lock:
            now = self.clock()
            ids = [i for i, deadline in self._claimed.items() if deadline <= now][:batch]
            while self._due and self._due[0][0] <= now + lead and len(ids) < batch:
                ids.append(heapq.heappop(self._due)[1])
            out = []
            for task_id in ids:
                if task_id in self._items:
                    due, payload = self._items[task_id]
                    self._claimed[task_id] = now + hold
                    out.append(Parked(task_id, max(0.0, due - now), payload))
            return out

    def done(self, task_id: str) -> None:
        """See `Deferrals.done`."""
        with self._lock:
            self._items.pop(task_id, None)
            self._claimed.pop(task_id, None)

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """See `Deferrals.expect`."""
        with self._lock:
            current = self._run.get(task_id, "")
            if current.startswith("ran:") and current != f"ran:{prior}":
                return False
            self._run[task_id] = token
            return True

    def begin(self, task_id: str, token: str | None) -> bool:
        """See `Deferrals.begin`."""
        with self._lock:
            current = self._run.get(task_id)
            if token is None:
                return current is None
            if current is None or current == token:
                self._run[task_id] = f"ran:{token}"
                return True
            return current == f"ran:{token}"


def release_due(deferrals: Deferrals, lead: float, publish: Callable[[Parked, str], None]) -> int:
    """Publish (with ``publish(item, token)``) every parked task due within ``lead``
    seconds; returns how many were published.

    Each copy gets a fresh token, so that if a crashed releaser's claim is taken over,
    only one of the copies it may have left behind runs.
    """
    published = 0
    for item in deferrals.claim(lead, BATCH, HOLD):
        token = uuid.uuid4().hex
        if deferrals.expect(item.task_id, token):
            publish(item, token)
            published += 1
        deferrals.done(item.task_id)
    return published


def deferrals_for(store: Any) -> Deferrals:
    """The deferrals that go with a limiter's store: in Redis beside a `RedisStore`."""
    codec = getattr(store, "_codec", None)
    if codec is not None and hasattr(store, "client"):
        return RedisDeferrals(store.client, codec.tag, codec.clock)
    return MemoryDeferrals(getattr(store, "_clock", time.time))
