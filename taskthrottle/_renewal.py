"""Keeping a live holder's concurrency slots held, so that they can expire soon after a
holder dies (a short lease TTL) and never under one that is still running."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence

from taskthrottle._entries import Entry
from taskthrottle._exceptions import StoreError
from taskthrottle._store import Store

log = logging.getLogger("taskthrottle")


class Renewer:
    """Renews the slots of this process's unreleased leases: one store call every third of
    their TTL for all of them, from one daemon thread that runs while there are any.

    A lease whose slots the store no longer held (it was stalled past its TTL and another
    holder may have its slot now) is dropped with one warning: it is not taken back.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._reset()
        reset = weakref.WeakMethod(self._reset)  # the hook must not keep this object alive

        def after_fork() -> None:
            method = reset()
            if method is not None:
                method()

        os.register_at_fork(after_in_child=after_fork)

    def _reset(self) -> None:
        """Start empty: in a forked child the parent's leases and thread stay with it, and
        the lock may have been held by the parent's thread."""
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[Sequence[Entry], int]] = {}
        self._thread: threading.Thread | None = None
        self._every = 0.0

    def hold(self, lease_id: str, slots: Sequence[Entry], ttl_ms: int) -> None:
        """Keep ``slots`` of ``lease_id`` held ``ttl_ms`` ahead until `drop`."""
        with self._lock:
            self._leases[lease_id] = (slots, ttl_ms)
            every = ttl_ms / 3000
            if self._thread is None:
                self._every = every
                self._thread = threading.Thread(
                    target=self._run, name="taskthrottle-renewer", daemon=True
                )
                self._thread.start()
            self._every = min(self._every, every)

    def drop(self, lease_id: str) -> None:
        """Stop renewing ``lease_id`` (it is released, or about to be)."""
        with self._lock:
            self._leases.pop(lease_id, None)

    def held(self) -> list[str]:
        """The lease ids being renewed."""
        with self._lock:
            return list(self._leases)

    def renew(self) -> None:
        """Renew every lease now: one store call per distinct TTL (in practice one)."""
        with self._lock:
            by_ttl: dict[int, list[tuple[str, Sequence[Entry]]]] = {}
            for lease_id, (slots, ttl_ms) in self._leases.items():
                by_ttl.setdefault(ttl_ms, []).append((lease_id, slots))
        for ttl_ms, leases in by_ttl.items():
            try:
                held = self._store.renew(leases, ttl_ms)
            except StoreError:
                continue  # the outage is logged once; the slots live out their TTL
            for (lease_id, _), ok in zip(leases, held, strict=True):
                if not ok:
                    log.warning("taskthrottle: lease %s lost its slots before renewal", lease_id)
                    self.drop(lease_id)

    def _run(self) -> None:
        while True:
            time.sleep(self._every)  # a timer: nothing to wait for but the time
            with self._lock:
                if not self._leases:  # ends with the last lease; the next one starts it again
                    self._thread = None
                    return
            try:
                self.renew()
            except Exception:  # a bug: say so, and keep renewing
                log.exception("taskthrottle: renewing slots failed")
