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
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple, Protocol, runtime_checkable

from taskthrottle._exceptions import StoreError

log = logging.getLogger("taskthrottle")

#: Seconds a run key outlives the turn it was set for, so that copies held up on the way
#: (a busy worker, a broker that was down) are still recognised as stale.
RUN_KEY_TTL = 3_600
#: What `Deferrals.begin` answers for a redelivery of a delivery that took its task over.
OWNED = 2
#: The maker a releaser's copy names when it asks to be published: no delivery made it, so
#: it may not pass for an original delivery handing itself back.
RELEASED = "*"
#: The most tasks an app may have parked at once, and the largest one, in bytes: past
#: either a task waits in the broker instead.
MAX_PARKED = 100_000
MAX_PARKED_BYTES = 1 << 20


class ParkRefused(StoreError):
    """Raised when a task cannot be parked (too many parked, or too large): it waits in the
    broker instead."""


class Unreadable(Exception):
    """Raised by a releaser's ``publish`` for a parked task it cannot decode or may not
    accept; the task is set aside, and the others are published."""


#: How many parked tasks one claim takes at most.
BATCH = 200
#: Seconds a claim holds its tasks before another releaser may take them over: a releaser
#: publishes a batch in well under a second, and one that died loses its batch this long.
HOLD = 5.0


class Parked(NamedTuple):
    """A claimed task: its id, seconds until its turn, and the payload it was parked with."""

    task_id: str
    due_in: float
    payload: bytes


class Claim(NamedTuple):
    """What one claim found: the tasks it took, how many remain parked or claimed, and
    whether the parking data is intact (False when it vanished since tasks were parked)."""

    parked: list[Parked]
    remaining: int
    intact: bool


class Deferrals(Protocol):
    """Parking and run tokens, as the task-queue integrations use them."""

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """Keep ``payload`` until ``due_in`` seconds from now; the original copy is now stale."""
        ...

    def claim(self, lead: float, batch: int, hold: float) -> Claim:
        """Tasks due within ``lead`` seconds (and claims older than ``hold`` seconds)."""
        ...

    def done(self, task_id: str) -> None:
        """Forget a parked task once its copy is published."""
        ...

    def aside(self, task_id: str) -> None:
        """Set a parked task aside (kept a week, never published): it cannot be read."""
        ...

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """Let the copy carrying ``token`` run; False if an earlier copy already ran, unless
        that is ``prior``, the delivery that is handing itself back again (None: an
        original delivery; `RELEASED`: a releaser publishing a parked task)."""
        ...

    def begin(self, task_id: str, token: str | None, prior: str | None = None) -> int:
        """May this delivery (a copy with ``token``, published by the copy holding ``prior``,
        or the original) run? 0: no; 1: yes; `OWNED`: it is a redelivery of a delivery that
        took its task over (`own`), which runs again only where the broker acknowledges
        after the body (acks_late, Dramatiq), and is a duplicate where it acknowledged early."""
        ...

    def own(self, task_id: str, token: str | None, prior: str | None = None) -> bool:
        """Let the delivery holding ``token`` (published by ``prior``) run its body where it
        is, after a hand-back that failed: whatever that hand-back may have parked or
        published all the same is stale now. False if such a copy started already."""
        ...


class RedisDeferrals:
    """Deferrals in Redis under the hash tag ``tag``: in the broker's Redis by default,
    so that parked tasks are as durable as the queue's own messages."""

    _source = resources.files("taskthrottle").joinpath("lua/deferrals.lua").read_text()

    def __init__(
        self,
        client: Any,
        tag: str,
        clock: Callable[[], float] | None = None,
        app: str = "default",
    ) -> None:
        self.client = client
        self.tag = tag
        self.clock = clock
        self._script = client.register_script(self._source)
        park = f"{tag}:park:{app}"
        self._park = [f"{park}:due", f"{park}:claimed", f"{park}:items"]
        self._more = [f"{park}:epoch", f"{park}:aside"]

    def _call(self, op: str, task_id: str | None, *args: Any) -> Any:
        keys = [*self._park, f"{self.tag}:run:{task_id or ''}", *self._more]
        now = "" if self.clock is None else str(round(self.clock() * 1000))
        try:
            return self._script(keys=keys, args=[now, op, *args])
        except Exception as exc:  # redis-py's errors, whichever client made them
            raise StoreError(f"deferrals {op} failed: {exc}") from exc

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """See `Deferrals.park`."""
        check_parkable(task_id, payload)
        ttl = math.ceil(due_in) + RUN_KEY_TTL
        if not self._call("park", task_id, task_id, round(due_in * 1000), ttl, payload, MAX_PARKED):
            raise ParkRefused(
                f"{MAX_PARKED} tasks are parked already: {task_id} waits in the broker"
            )

    def claim(self, lead: float, batch: int, hold: float) -> Claim:
        """See `Deferrals.claim`."""
        reply = self._call("claim", None, round(lead * 1000), batch, round(hold * 1000))
        parked = [
            Parked(reply[i].decode(), int(reply[i + 1]) / 1000, reply[i + 2])
            for i in range(2, len(reply), 3)
        ]
        return Claim(parked, int(reply[1]), bool(reply[0]))

    def done(self, task_id: str) -> None:
        """See `Deferrals.done`."""
        self._call("done", None, task_id)

    def aside(self, task_id: str) -> None:
        """See `Deferrals.aside`."""
        self._call("aside", None, task_id)

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """See `Deferrals.expect`."""
        return bool(self._call("expect", task_id, task_id, token, RUN_KEY_TTL, prior or ""))

    def begin(self, task_id: str, token: str | None, prior: str | None = None) -> int:
        """See `Deferrals.begin`."""
        return int(self._call("begin", task_id, task_id, token or "", RUN_KEY_TTL, prior or ""))

    def own(self, task_id: str, token: str | None, prior: str | None = None) -> bool:
        """See `Deferrals.own`."""
        return bool(self._call("own", task_id, task_id, token or "", RUN_KEY_TTL, prior or ""))

    def warn_if_volatile(self) -> None:
        """Log one warning when this Redis can lose parked tasks: nothing kept on disk, or
        an eviction policy that may drop them. Quiet when CONFIG is not allowed."""
        try:
            config = self.client.config_get("appendonly") | self.client.config_get("save")
            config |= self.client.config_get("maxmemory-policy")
        except Exception:  # an ACL without CONFIG, a managed Redis: nothing to tell
            return
        text = {str(k): str(v) for k, v in _decoded(config).items()}
        where = _where(self.client)
        if text.get("appendonly") == "no" and not text.get("save"):
            log.warning(
                "taskthrottle: parked tasks live in %s, which keeps nothing on disk "
                "(appendonly no, save ''): a restart loses them; enable appendonly there, "
                "or set park_url to a Redis that persists",
                where,
            )
        if text.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning(
                "taskthrottle: parked tasks live in %s, whose maxmemory-policy %s may evict "
                "them; set maxmemory-policy noeviction there, or set park_url to one that does",
                where,
                text["maxmemory-policy"],
            )


def _decoded(config: dict[Any, Any]) -> dict[Any, Any]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in config.items()
    }


def _where(client: Any) -> str:
    """The address of a redis-py client's server, never its password."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"redis at {kwargs.get('host', '?')}:{kwargs.get('port', '?')} db {kwargs.get('db', 0)}"


class MemoryDeferrals:
    """Deferrals in this process's memory, for a `MemoryStore` (one process, tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._due: list[tuple[float, str]] = []
        self._items: dict[str, tuple[float, bytes]] = {}
        self._claimed: dict[str, float] = {}
        self._run: dict[str, str] = {}
        self.set_aside: dict[str, bytes] = {}

    def park(self, task_id: str, due_in: float, payload: bytes) -> None:
        """See `Deferrals.park`."""
        check_parkable(task_id, payload)
        with self._lock:
            if len(self._items) >= MAX_PARKED and task_id not in self._items:
                raise ParkRefused(f"{MAX_PARKED} tasks are parked: {task_id} waits in the broker")
            due = self.clock() + due_in
            heapq.heappush(self._due, (due, task_id))
            self._items[task_id] = (due, payload)
            self._run[task_id] = "parked"

    def claim(self, lead: float, batch: int, hold: float) -> Claim:
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
            return Claim(out, len(self._items), intact=True)

    def done(self, task_id: str) -> None:
        """See `Deferrals.done`."""
        with self._lock:
            self._items.pop(task_id, None)
            self._claimed.pop(task_id, None)

    def aside(self, task_id: str) -> None:
        """See `Deferrals.aside`."""
        with self._lock:
            item = self._items.pop(task_id, None)
            self._claimed.pop(task_id, None)
            if item is not None:
                self.set_aside[task_id] = item[1]

    def expect(self, task_id: str, token: str, prior: str | None = None) -> bool:
        """See `Deferrals.expect`."""
        with self._lock:
            current = self._run.get(task_id)
            original_again = not prior and current == "body:"  # see deferrals.lua
            if _started(current) and not _made_by(current, prior) and not original_again:
                return False
            self._run[task_id] = token
            return True

    def begin(self, task_id: str, token: str | None, prior: str | None = None) -> int:
        """See `Deferrals.begin`."""
        with self._lock:
            current = self._run.get(task_id)
            if current == f"body:{token or ''}":
                return OWNED
            if not token:
                return current is None
            if current == f"ran:{token}":
                return True
            if current in (None, token) or (prior and current in (prior, f"ran:{prior}")):
                self._run[task_id] = f"ran:{token}"
                return True
            return False

    def own(self, task_id: str, token: str | None, prior: str | None = None) -> bool:
        """See `Deferrals.own`."""
        mark = f"body:{token or ''}"
        with self._lock:
            current = self._run.get(task_id)
            mine = current in (f"ran:{token or ''}", mark)
            if _started(current) and not mine and not _made_by(current, prior):
                return False
            self._items.pop(task_id, None)
            self._claimed.pop(task_id, None)
            self._run[task_id] = mark
            return True


def _started(current: str | None) -> bool:
    """Whether a run key names a copy that started (see deferrals.lua)."""
    return current is not None and current.startswith(("ran:", "body:"))


def _made_by(current: str | None, prior: str | None) -> bool:
    """Whether a run key is the mark of ``prior``, the delivery that made this copy."""
    return bool(prior) and current in (prior, f"ran:{prior}", f"body:{prior}")


def check_parkable(task_id: str, payload: bytes) -> None:
    """Refuse a payload past `MAX_PARKED_BYTES`: one tenant must not fill the parking Redis."""
    if len(payload) > MAX_PARKED_BYTES:
        msg = f"{task_id} is {len(payload)} bytes, past {MAX_PARKED_BYTES}: it waits in the broker"
        raise ParkRefused(msg)


class Releaser:
    """Publishes parked tasks shortly before their turn, from one thread of a worker: with
    ``publish(item, token)``, each copy with a fresh token, so that if a crashed releaser's
    claim is taken over only one of the copies it may have left behind runs. Says once
    when the store fails and once when it is back, and once at ERROR when parked tasks
    vanished (the parking Redis restarted empty, was flushed, or evicted them)."""

    def __init__(self, deferrals: Deferrals, lead: float) -> None:
        self.deferrals = deferrals
        self.lead = lead
        self.remaining = 0
        self.failing: set[str] = set()  # what is failing now: "claim", "publish"

    def release(self, publish: Callable[[Parked, str], None]) -> int:
        """Publish every parked task due within the lead; returns how many were published."""
        try:
            claim = self.deferrals.claim(self.lead, BATCH, HOLD)
        except StoreError as exc:
            self._failed("claim", f"cannot reach parked tasks ({exc})")
            return 0
        self._recovered("claim", "parked tasks are reachable again")
        if not claim.intact and self.remaining:
            log.error(
                "taskthrottle: parked tasks vanished: %d were parked, the parking Redis now "
                "has none of them (restarted empty, flushed or evicted); see docs/reliability.md",
                self.remaining,
            )
        self.remaining = claim.remaining
        published = 0
        for item in claim.parked:
            token = uuid.uuid4().hex
            try:
                if self.deferrals.expect(item.task_id, token, prior=RELEASED):
                    publish(item, token)
                    published += 1
            except Unreadable as exc:
                log.error("taskthrottle: parked task %s set aside: %s", item.task_id, exc)
                self.deferrals.aside(item.task_id)
                continue
            except Exception as exc:  # the broker is down, say: the claims lapse, then retry
                self._failed("publish", f"could not publish parked task {item.task_id}: {exc!r}")
                break
            self._recovered("publish", "parked tasks are published again")
            self.deferrals.done(item.task_id)
        return published

    def _failed(self, what: str, message: str) -> None:
        if what not in self.failing:
            log.error("taskthrottle: %s; will keep trying", message)
            self.failing.add(what)

    def _recovered(self, what: str, message: str) -> None:
        if what in self.failing:
            log.info("taskthrottle: %s", message)
            self.failing.discard(what)


@runtime_checkable
class Parks(Protocol):
    """A store that says where the integrations park tasks beside it (`MemoryStore`,
    `RedisStore`; a store of your own may too)."""

    def deferrals(self, app: str, client: Any = None, namespace: str = "taskthrottle") -> Deferrals:
        """The deferrals of ``app``: in ``client``'s Redis if given, else beside the store."""
        ...


def deferrals_for(
    store: object, client: Any = None, namespace: str = "taskthrottle", app: str = "default"
) -> Deferrals:
    """The deferrals that go with a limiter's store (see `Parks`); a store that does not
    say parks in this process's memory, or in ``client``'s Redis, and a WARNING says so."""
    if isinstance(store, Parks):
        return store.deferrals(app, client, namespace)
    where = "this process's memory" if client is None else "the broker's Redis"
    log.warning(
        "taskthrottle: %s has no deferrals(): parked tasks of %s live in %s",
        type(store).__name__,
        app,
        where,
    )
    if client is not None:
        return RedisDeferrals(client, "{" + namespace + "}", None, app)
    return MemoryDeferrals()
