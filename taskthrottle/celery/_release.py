"""The releaser: in each worker node, publish parked tasks shortly before their turn."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from taskthrottle._deferrals import Parked
from taskthrottle._deferrals import release_due as release
from taskthrottle._exceptions import StoreError
from taskthrottle.celery._gate import HEADER, decode, state_of

log = logging.getLogger("taskthrottle.celery")


def release_due(app: Any) -> int:
    """Publish every parked task of ``app`` due within the lead; returns how many."""
    state = state_of(app)

    def publish(item: Parked, token: str) -> None:
        copy = app.signature(decode(item.payload))
        headers = copy.options.setdefault("headers", {})
        headers[HEADER] = {**headers.get(HEADER, {}), "token": token}
        copy.apply_async(countdown=max(item.due_in, 0.001))

    return release(state.deferrals(), state.settings.park_lead, publish)


class Releaser(bootsteps.StartStopStep):
    """A worker step: one thread per node that releases parked tasks every ``park_poll``."""

    label = "taskthrottle releaser"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.app = worker.app
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        """Start releasing."""
        self.thread = threading.Thread(target=self.run, name="taskthrottle-releaser", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        """Stop releasing (parked tasks wait for another worker, or this one's return)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        poll = state_of(self.app).settings.park_poll
        while not self.stopping.wait(poll):
            try:
                release_due(self.app)
            except (StoreError, OSError, ConnectionError):
                log.exception("taskthrottle: releasing parked tasks failed; will try again")
            except Exception:
                log.exception("taskthrottle: releasing parked tasks failed; will try again")
