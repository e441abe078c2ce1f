"""What the fault apps read from their environment, shared by the Celery and Dramatiq apps.

TT_BROKER, TT_STORE   Redis URLs of the broker and of the limiter's store
TT_NS, TT_QUEUE       the store namespace (and broker key prefix), the queue
TT_RATE, TT_PERIOD, TT_BURST   the token bucket of ``limited``: RATE per PERIOD s, BURST
TT_CAP                slots of ``guarded``'s concurrency limit
TT_ACKS_LATE          "1": acks_late and reject_on_worker_lost (Celery)
TT_ON_STORE_ERROR     "defer", "allow" or "local"
TT_LOCAL_SHARE        under "local", the part of each limit a worker process takes
TT_LEASE_TTL          seconds a dead holder keeps its slots
TT_VISIBILITY         the Celery Redis transport's visibility_timeout (seconds)
TT_HEARTBEAT          ms before Dramatiq's Redis broker takes a silent worker for dead
TT_HANG_KEY, TT_HANG_MARKER   the first run of ``guarded(TT_HANG_KEY)`` creates the marker
                      file and sleeps (bounded) until the test kills its worker
TT_JOURNAL            the directory of the journal (see journal.py)
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from taskthrottle import Limit, Limiter, RedisStore

#: A URL nothing listens on: what an app module imported outside a fleet points at.
NOWHERE = "redis://127.0.0.1:1/0"
#: How long a hanging body sleeps at most: far longer than any test waits to kill it.
HANG_SECONDS = 30.0


#: The signal on which every worker process writes the stacks of all its threads to its
#: log (the suite sends it to a fleet whose tasks did not all end).
DUMP_STACKS = signal.SIGUSR2


def dump_stacks_on_signal() -> None:
    """Install the stack dump in this worker process, into ``<TT_JOURNAL>/<pid>.stacks``
    (the frameworks redirect stderr), and journal that it did (``boot``): only such
    processes are sent the signal, which would kill any other."""
    from tests.faults.journal import record

    path = Path(os.environ["TT_JOURNAL"]) / f"{os.getpid()}.stacks"
    _dumps.append(path.open("a"))  # open as long as the process lives
    faulthandler.register(DUMP_STACKS, file=_dumps[-1], all_threads=True)
    record("boot", "-")


_dumps: list[TextIO] = []


@dataclass(frozen=True)
class Config:
    broker: str
    store: str
    ns: str
    queue: str
    rate: float
    period: float
    burst: float
    cap: float
    acks_late: bool
    on_store_error: str
    local_share: float | None
    lease_ttl: float
    visibility: float
    heartbeat_ms: int
    hang_key: str
    hang_marker: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        return cls(
            broker=env.get("TT_BROKER", NOWHERE),
            store=env.get("TT_STORE", NOWHERE),
            ns=env.get("TT_NS", "tt-faults"),
            queue=env.get("TT_QUEUE", "tt-faults"),
            rate=float(env.get("TT_RATE", "10")),
            period=float(env.get("TT_PERIOD", "2")),
            burst=float(env.get("TT_BURST", env.get("TT_RATE", "10"))),
            cap=float(env.get("TT_CAP", "1")),
            acks_late=env.get("TT_ACKS_LATE") == "1",
            on_store_error=env.get("TT_ON_STORE_ERROR", "defer"),
            local_share=float(env["TT_LOCAL_SHARE"]) if env.get("TT_LOCAL_SHARE") else None,
            lease_ttl=float(env.get("TT_LEASE_TTL", "30")),
            visibility=float(env.get("TT_VISIBILITY", "3600")),
            heartbeat_ms=int(env.get("TT_HEARTBEAT", "60000")),
            hang_key=env.get("TT_HANG_KEY", ""),
            hang_marker=env.get("TT_HANG_MARKER", ""),
        )

    def bucket(self) -> Limit:
        return Limit.per_period("rate", self.rate, self.period, burst=self.burst)

    def limiter_factory(self) -> Callable[[], Limiter]:
        """Builds the limiter once per worker process, after the fork."""

        def make() -> Limiter:
            store = RedisStore.from_url(
                self.store, namespace=self.ns, socket_timeout=0.5, connect_timeout=0.5
            )
            return Limiter(store, lease_ttl=self.lease_ttl)

        return make

    def hang_if_chosen(self, key: str) -> None:
        """The first run of the chosen key hangs (bounded) so that its worker can be killed."""
        if not self.hang_key or key != self.hang_key or os.path.exists(self.hang_marker):
            return
        Path(self.hang_marker).touch()
        time.sleep(HANG_SECONDS)
