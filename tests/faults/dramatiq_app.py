"""The Dramatiq app the fault suite runs in real workers (configured as config.py says).

    dramatiq tests.faults.dramatiq_app:setup --queues $TT_QUEUE ...

A RedisBroker on TT_BROKER (namespace ``<TT_NS>-dramatiq``) with the ThrottleMiddleware; the
actors journal their bodies (journal.py) under a test-chosen key, their first argument.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.actor import ActorDecorator
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from taskthrottle.dramatiq import ThrottleMiddleware
from tests.faults.config import Config, dump_stacks_on_signal
from tests.faults.journal import record

#: Fast retries (ms), so that a message the middleware hands to Retries (DeferFailed) is
#: seen to come back within a test; as many of them as Dramatiq allows by default (20).
MIN_BACKOFF, MAX_BACKOFF = 500, 2000


@dataclass(frozen=True)
class App:
    broker: RedisBroker
    limited: dramatiq.Actor[..., None]
    guarded: dramatiq.Actor[..., None]

    @staticmethod
    def namespace(config: Config) -> str:
        return f"{config.ns}-dramatiq"


class Journal(dramatiq.Middleware):
    """Journals every delivery, and every failed one (an exception in a middleware or the
    actor)."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        record("deliver", str(message.args[0]) if message.args else "?")

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None:
            key = message.args[0] if message.args else "?"
            record("fail", str(key), f"{type(exception).__name__}: {exception}")


def build(env: Mapping[str, str]) -> App:
    """The broker and actors of one fleet."""
    config = Config.from_env(env)
    broker = RedisBroker(
        url=config.broker,
        namespace=App.namespace(config),
        heartbeat_timeout=config.heartbeat_ms,
        maintenance_chance=100_000,  # one command in ten: dead workers' messages come back soon
    )
    broker.add_middleware(CurrentMessage())
    throttle = ThrottleMiddleware(
        config.limiter_factory(),
        horizon=120.0,
        on_store_error=config.on_store_error,
        local_share=config.local_share,
    )
    broker.add_middleware(throttle)
    broker.add_middleware(Journal(), before=ThrottleMiddleware)

    def limited(key: str, hold: float = 0.0) -> None:
        """Under the token bucket; the body lasts ``hold`` seconds."""
        _begin(key)
        time.sleep(hold)
        record("end", key)

    def guarded(key: str, hold: float = 0.3) -> None:
        """At most TT_CAP bodies at once, each lasting ``hold`` seconds."""
        _begin(key)
        config.hang_if_chosen(key)
        time.sleep(hold)
        record("end", key)

    bucket = {"limits": [config.bucket()], "key": "shared"}
    slots = {"concurrency": config.cap, "key": "guarded"}

    def declare(name: str, throttle: dict[str, Any]) -> ActorDecorator:
        return dramatiq.actor(
            actor_name=f"faults.{name}",
            broker=broker,
            queue_name=config.queue,
            throttle=throttle,
            max_retries=20,
            min_backoff=MIN_BACKOFF,
            max_backoff=MAX_BACKOFF,
        )

    return App(broker, declare("limited", bucket)(limited), declare("guarded", slots)(guarded))


def _begin(key: str) -> None:
    record("start", key)
    message = CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message is not None else 0
    if retries:
        record("retried", key, retries)


def setup() -> None:
    """The worker's entry point: the fleet's broker becomes the global one."""
    dump_stacks_on_signal()
    dramatiq.set_broker(build(os.environ).broker)
