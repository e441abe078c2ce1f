"""The Celery app the fault suite runs in real prefork workers (configured as config.py says).

    celery -A tests.faults.celery_app worker -Q $TT_QUEUE ...

Every task takes a test-chosen key first and journals its body (journal.py), so that a
redelivery or a second copy of the same task shows as a second ``start``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

import taskthrottle.celery
from taskthrottle import throttled
from tests.faults.config import Config, dump_stacks_on_signal
from tests.faults.journal import record


def make_app(env: Mapping[str, str]) -> Celery:
    """The app for one fleet: its broker, store, namespace, queue and limits."""
    config = Config.from_env(env)
    app = Celery("tt_faults", broker=config.broker, set_as_current=False)
    app.conf.update(
        task_default_queue=config.queue,
        broker_transport_options={
            "global_keyprefix": f"{config.ns}:kombu:",
            "visibility_timeout": config.visibility,
            # Sweep for messages past their visibility timeout every second, not every 100 s.
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        task_acks_late=config.acks_late,
        task_reject_on_worker_lost=config.acks_late,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
    )
    taskthrottle.celery.install(
        app,
        config.limiter_factory(),
        horizon=120.0,
        on_store_error=config.on_store_error,
        local_share=config.local_share,
    )

    @app.task(name="faults.limited", bind=True, shared=False)
    @throttled(config.bucket(), key="shared")
    def limited(self: Any, key: str, hold: float = 0.0) -> None:
        """Under the token bucket; the body lasts ``hold`` seconds."""
        _begin(key, self.request.retries)
        time.sleep(hold)
        record("end", key)

    @app.task(name="faults.guarded", bind=True, shared=False)
    @throttled(concurrency=config.cap, key="guarded")
    def guarded(self: Any, key: str, hold: float = 0.3) -> None:
        """At most TT_CAP bodies at once, each lasting ``hold`` seconds."""
        _begin(key, self.request.retries)
        config.hang_if_chosen(key)
        time.sleep(hold)
        record("end", key)

    return app


def _begin(key: str, retries: int) -> None:
    record("start", key)
    if retries:
        record("retried", key, retries)


@signals.task_prerun.connect(weak=False, dispatch_uid="tt-faults-delivery")
def _delivered(args: Any = (), **_: Any) -> None:
    """Every delivery that reaches the pool, deferred ones included."""
    record("deliver", str(args[0]) if args else "?")


@signals.task_failure.connect(weak=False, dispatch_uid="tt-faults-failure")
def _failed(args: Any = (), exception: BaseException | None = None, **_: Any) -> None:
    key = args[0] if args else "?"
    record("fail", str(key), f"{type(exception).__name__}: {exception}")


@signals.task_internal_error.connect(weak=False, dispatch_uid="tt-faults-internal")
def _internal(args: Any = (), exception: BaseException | None = None, **_: Any) -> None:
    key = args[0] if args else "?"
    record("fail", str(key), f"internal {type(exception).__name__}: {exception}")


@signals.worker_process_init.connect(weak=False, dispatch_uid="tt-faults-stacks")
def _pool_process_started(**_: Any) -> None:
    dump_stacks_on_signal()


if "TT_JOURNAL" in os.environ:  # the main process of a worker of the suite's
    dump_stacks_on_signal()
app = make_app(os.environ)
