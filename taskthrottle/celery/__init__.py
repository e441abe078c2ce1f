"""Celery: ``install(app, limiter)`` makes every ``@throttled`` task wait for its turn.

    import taskthrottle.celery
    taskthrottle.celery.install(app, Limiter(RedisStore.from_url("redis://...")))

A throttled task is never run over the limit, never lost, never failed and never
counted against ``max_retries``: it comes back at the turn its reservation holds (see
`taskthrottle.celery._gate`). Far turns are parked in the store and released by every
worker node shortly before they are due (see `taskthrottle.celery._release`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from taskthrottle._exceptions import require

require("celery", "celery")

from celery import Celery  # noqa: E402  (after the check that names the missing extra)

from taskthrottle._limiter import Limiter  # noqa: E402
from taskthrottle._settings import Settings, State  # noqa: E402
from taskthrottle._throttle import plan, throttles_of  # noqa: E402
from taskthrottle.celery._gate import (  # noqa: E402
    HEADER,
    ThrottledTask,
    gated_call,
    spare_refusals,
    state_of,
)
from taskthrottle.celery._release import ReleaseStep, release_due  # noqa: E402

__all__ = [
    "HEADER",
    "Settings",
    "ThrottledTask",
    "delay_for",
    "install",
    "limiter_for",
    "release_due",
]


def install(
    app: Celery, limiter: Limiter | Callable[[], Limiter] | str | None = None, **settings: Any
) -> None:
    """Enforce ``@throttled`` on the tasks of ``app``.

    ``limiter`` is a `Limiter` (shared by every worker when its store is Redis), a
    factory called once per worker process, the URL of the Redis to keep the limits in,
    or None to build one from ``app.conf.taskthrottle_redis_url`` (a `MemoryStore` when
    that is unset). ``settings`` override the `Settings` read from ``app.conf``.

    Parked tasks live in the broker's Redis when the broker is Redis (so they are as
    durable as the queue), else beside the limits; ``park_url`` names another Redis.
    """
    if isinstance(limiter, str):
        settings = {**settings, "redis_url": limiter}
        limiter = None
    conf = Settings.from_conf(app.conf, **settings)
    if conf.redis_url and limiter is None:
        _check_url(conf.redis_url)
    _censor(app)
    parking = lambda: parking_client(app, conf)  # noqa: E731  (made in each worker process)
    app.taskthrottle = State(conf, limiter, parking, app=f"celery.{app.main or 'default'}")
    app.Task = type("Task", (ThrottledTask, app.Task), {})  # the base of tasks made from now on
    app.steps["worker"].add(ReleaseStep)
    app.on_after_finalize.connect(_upgrade_tasks, weak=False, dispatch_uid="taskthrottle")
    if app.finalized:
        _upgrade_tasks(app)


def _censor(app: Celery) -> None:
    """Mask the passwords of the URL settings in ``app.conf`` (read already), which Celery's
    ``inspect conf`` and bug reports would otherwise print: it censors only its own."""
    from kombu.utils.url import maybe_sanitize_url

    for name in ("taskthrottle_redis_url", "taskthrottle_park_url"):
        value = app.conf.get(name)
        if isinstance(value, str):
            app.conf[name] = maybe_sanitize_url(value, mask="********")


def _check_url(url: str) -> None:
    """Refuse a Redis URL redis-py cannot use, now rather than in every worker."""
    from taskthrottle._redis import RedisStore

    RedisStore.from_url(url)  # connects lazily: this only parses


def parking_client(app: Celery, settings: Settings) -> Any:
    """The Redis client parked tasks live in: ``park_url``, else the broker's when it is
    Redis (None: park beside the limiter's state)."""
    url = settings.park_url
    if url is None:
        broker = app.conf.broker_url or ""
        first = (broker[0] if isinstance(broker, list) else broker).split(";")[0].strip()
        if not first.startswith(("redis://", "rediss://", "unix://")):
            return None
        url = first
    from taskthrottle._redis import client_for

    return client_for(url)


def _upgrade_tasks(sender: Celery, **_: Any) -> None:
    """Give the gate to tasks made before ``install``, or with a base class of their own;
    keep ``autoretry_for`` from retrying what the gate hands back."""
    for task in sender.tasks.values():
        cls = type(task)
        if task.name.startswith("celery."):
            continue
        spare_refusals(task)
        if issubclass(cls, ThrottledTask):
            continue
        if cls.__call__ is not gated_call:
            cls._taskthrottle_next_call = cls.__call__
            cls.__call__ = gated_call


def limiter_for(app: Celery) -> Limiter:
    """The limiter ``install`` gave ``app``, in this process."""
    return state_of(app).limiter()


def delay_for(task: Any, *args: Any, **kwargs: Any) -> float:
    """Seconds a call of ``task`` with these arguments would wait for its turn if sent now
    (0.0 when it would run at once); read-only, for callers deciding before they send."""
    state = state_of(task.app)
    throttles = throttles_of(task) or state.default
    if not throttles:
        return 0.0
    ask = plan(throttles, task.run, args, kwargs, default_key=task.name)
    return state.limiter().wait_time(ask.target, consume=ask.consume)
