"""The test's side of each framework: start nodes, send tasks, tell when the queues are
drained, and what the broker knows of failed messages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from tests.faults.config import Config
from tests.faults.fleet import Fleet, Worker


class Driver(Protocol):
    name: str

    def start(self, fleet: Fleet, nodes: int) -> list[Worker]:
        """Start ``nodes`` worker nodes of two processes (Celery) or 1 x 2 threads each."""
        ...

    def send(self, task: str, key: str, *args: float) -> None:
        """Send task ``task`` ("limited" or "guarded") with ``key`` as its first argument."""
        ...

    def in_flight(self, broker: redis.Redis) -> int:
        """Messages the broker still holds: queued, delayed or delivered and unacked."""
        ...

    def dead_letters(self, broker: redis.Redis) -> list[str]:
        """Keys of dead-lettered messages (Dramatiq; Celery has none)."""
        ...

    def held(self, broker: redis.Redis) -> dict[str, str]:
        """Where the broker holds each task it still has: key -> place."""
        ...

    def close(self) -> None: ...


class CeleryDriver:
    name = "celery"

    def __init__(self, env: Mapping[str, str], concurrency: int = 2) -> None:
        from tests.faults.celery_app import make_app

        self.config = Config.from_env(env)
        self.app = make_app(env)
        self.concurrency = concurrency

    def start(self, fleet: Fleet, nodes: int) -> list[Worker]:
        return fleet.celery(nodes, concurrency=self.concurrency)

    def send(self, task: str, key: str, *args: float) -> None:
        # The key is the task id too, so that worker logs name it.
        self.app.send_task(
            f"faults.{task}", args=[key, *args], queue=self.config.queue, task_id=key
        )

    def in_flight(self, broker: redis.Redis) -> int:
        prefix = f"{self.config.ns}:kombu:"
        queued: Any = broker.llen(prefix + self.config.queue)
        unacked: Any = broker.hlen(prefix + "unacked")
        return int(queued) + int(unacked)

    def dead_letters(self, broker: redis.Redis) -> list[str]:
        return []

    def held(self, broker: redis.Redis) -> dict[str, str]:
        prefix = f"{self.config.ns}:kombu:"
        queued: Any = broker.lrange(prefix + self.config.queue, 0, -1)
        unacked: Any = broker.hvals(prefix + "unacked")
        found = {_celery_id(json.loads(raw)): "queued" for raw in queued}
        found |= {_celery_id(json.loads(raw)[0]): "unacked" for raw in unacked}
        return found

    def close(self) -> None:
        self.app.close()


class DramatiqDriver:
    name = "dramatiq"

    def __init__(self, env: Mapping[str, str], threads: int = 2) -> None:
        from tests.faults.dramatiq_app import App, build

        self.config = Config.from_env(env)
        self.app = build(env)
        self.prefix = f"{App.namespace(self.config)}:{self.config.queue}"
        self.threads = threads

    def start(self, fleet: Fleet, nodes: int) -> list[Worker]:
        return fleet.dramatiq(nodes, processes=1, threads=self.threads)

    def send(self, task: str, key: str, *args: float) -> None:
        actor = self.app.limited if task == "limited" else self.app.guarded
        # The key is the message id too, so that worker logs name it.
        self.app.broker.enqueue(actor.message(key, *args).copy(message_id=key))

    def in_flight(self, broker: redis.Redis) -> int:
        # A message stays in its queue's .msgs hash from enqueue until it is acknowledged.
        ready: Any = broker.hlen(f"{self.prefix}.msgs")
        delayed: Any = broker.hlen(f"{self.prefix}.DQ.msgs")
        return int(ready) + int(delayed)

    def dead_letters(self, broker: redis.Redis) -> list[str]:
        import dramatiq

        found: Any = broker.hvals(f"{self.prefix}.XQ.msgs")
        keys = []
        for raw in found:
            message = dramatiq.Message.decode(raw)
            keys.append(f"{message.args[0] if message.args else '?'}")
        return sorted(keys)

    def held(self, broker: redis.Redis) -> dict[str, str]:
        found: dict[str, str] = {}
        for place, suffix in (("queued", ""), ("delayed", ".DQ")):
            ids: Any = broker.hkeys(f"{self.prefix}{suffix}.msgs")
            found |= {raw.decode(): place for raw in ids}
        return found

    def close(self) -> None:
        self.app.broker.close()


def _celery_id(message: dict[str, Any]) -> str:
    """The task id (our key) of a kombu message as the Redis transport stores it."""
    return str(message.get("headers", {}).get("id", "?"))


def driver_for(name: str, env: Mapping[str, str]) -> Driver:
    return CeleryDriver(env) if name == "celery" else DramatiqDriver(env)
