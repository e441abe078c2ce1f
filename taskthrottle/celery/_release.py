"""The releaser: in each worker node, publish parked tasks shortly before their turn."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps

from taskthrottle._deferrals import Parked, RedisDeferrals, Releaser
from taskthrottle.celery._gate import HEADER, decode, state_of

log = logging.getLogger("taskthrottle.celery")


def release_due(app: Any, releaser: Releaser | None = None) -> int:
    """Publish every parked task of ``app`` due within the lead; returns how many."""
    if releaser is None:
        state = state_of(app)
        releaser = Releaser(state.deferrals(), state.settings.park_lead)

    def publish(item: Parked, token: str) -> None:
        copy = app.signature(decode(app, item.payload))
        headers = copy.options.setdefault("headers", {})
        headers[HEADER] = {**headers.get(HEADER, {}), "token": token}
        copy.apply_async(countdown=max(item.due_in, 0.001))

    return releaser.release(publish)


class ReleaseStep(bootsteps.StartStopStep):
    """A worker step: one thread per node that releases parked tasks every ``park_poll``.

    It starts after the pool, and releases once in the worker's own thread before its
    thread takes over: a prefork child forked while that thread held the import lock (its
    first connection imports codecs) would wait for it forever. Children forked later find
    everything imported.
    """

    label = "taskthrottle releaser"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.app = worker.app
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.releaser: Releaser | None = None

    def start(self, worker: Any) -> None:
        """Release once, then start releasing every ``park_poll``."""
        state = state_of(self.app)
        deferrals = state.deferrals()
        if isinstance(deferrals, RedisDeferrals):
            deferrals.warn_if_volatile()
        self.releaser = Releaser(deferrals, state.settings.park_lead)
        self.release()
        self.thread = threading.Thread(target=self.run, name="taskthrottle-releaser", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        """Stop releasing (parked tasks wait for another worker, or this one's return)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        """The thread: release every ``park_poll`` until the worker stops."""
        while not self.stopping.wait(state_of(self.app).settings.park_poll):
            self.release()

    def release(self) -> None:
        """One round of releasing."""
        try:
            release_due(self.app, self.releaser)
        except Exception:  # a bug: say so, and keep releasing
            log.exception("taskthrottle: releasing parked tasks failed; will try again")
