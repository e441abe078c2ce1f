"""Settings shared by the task-queue integrations, and the state each keeps: a limiter and
its deferrals, made once per worker process."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from taskthrottle._deferrals import Deferrals, deferrals_for
from taskthrottle._exceptions import (
    InvalidInput,
)
from taskthrottle._limiter import Limiter
from taskthrottle._outage import POLICIES, check_policy
from taskthrottle._throttle import Throttle, throttle_spec

log = logging.getLogger("taskthrottle")

#: The furthest ahead (seconds) a task may book its turn: a turn further away is refused and
#: tried again later, so that no task holds a reservation, nor a run key, for days.
MAX_HORIZON = 3_600.0

_CHOICES = {
    "on_failure": ("keep", "refund"),
    "eager": ("wait", "bypass"),
    "on_store_error": (None, *POLICIES),
}


@dataclass(frozen=True)
class Settings:
    """How the gate behaves. Celery reads each field from ``app.conf.taskthrottle_<field>``
    too; Dramatiq takes them as keyword arguments of the middleware."""

    #: Seconds ahead a task may book its turn; beyond it the task comes back at retry-after.
    horizon: float = 300.0
    #: Random extra share of a retry-after, so that refused tasks do not all return at once.
    jitter: float = 0.1
    #: A turn further away than this many seconds is parked in the store, not in a worker.
    park_after: float = 5.0
    #: Parked tasks are published again this many seconds before their turn.
    park_lead: float = 2.0
    #: How often (seconds) each worker looks for parked tasks that are due.
    park_poll: float = 0.5
    #: Tokens a failed (raised, retried, timed-out) task consumed: "keep" or "refund".
    on_failure: str = "keep"
    #: In eager mode (``task_always_eager``, ``.apply()``): "wait" inline or "bypass".
    eager: str = "wait"
    #: When the store fails: "defer" the task (by ``store_retry`` seconds), "allow" it, or
    #: decide "local"ly with ``local_share`` of each limit; None keeps the limiter's own.
    on_store_error: str | None = None
    #: Seconds to defer a task by when the store failed.
    store_retry: float = 5.0
    #: Under ``on_store_error="local"``: the part of each limit one worker process takes.
    local_share: float | None = None
    #: A copy that comes back this many seconds past its booked turn books again.
    late_after: float = 1.0
    #: At most this many seconds between tries for a full concurrency limit: a slot is
    #: usually freed long before its holder's lease could expire.
    slot_poll: float = 1.0
    #: ``throttled(**default)`` for every task that has no throttle of its own.
    default: Mapping[str, Any] | None = None
    #: Where a limiter is built from when ``install`` is given none.
    redis_url: str | None = field(default=None, repr=False)  # it may carry a password
    #: The Redis parked tasks live in; by default the broker's when it is Redis, else the
    #: limiter's store.
    park_url: str | None = field(default=None, repr=False)
    #: The namespace of limits built from ``redis_url``; by default one of the app's own
    #: (``taskthrottle.celery.<app name>``): apps share limits only when they say so.
    namespace: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                msg = f"taskthrottle {name} must be one of {allowed}, got {getattr(self, name)!r}"
                raise InvalidInput(msg)
        numbers = ("horizon", "jitter", "park_after", "park_lead", "park_poll", "store_retry")
        for name in (*numbers, "slot_poll", "late_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"taskthrottle {name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"taskthrottle {name} must be finite and >= 0, got {value!r}")
        if self.horizon > MAX_HORIZON:
            msg = f"taskthrottle horizon must be at most {MAX_HORIZON:g} s, got {self.horizon!r}"
            raise InvalidInput(msg)
        if self.on_store_error is not None:
            check_policy(self.on_store_error, self.local_share)
        if self.park_poll <= 0:
            raise InvalidInput(f"taskthrottle park_poll must be above 0, got {self.park_poll!r}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], **overrides: Any) -> Settings:
        """Settings from ``taskthrottle_*`` keys of a Celery configuration, then overrides."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidInput(f"unknown taskthrottle settings {unknown} (known: {sorted(names)})")
        found = {name: conf.get(f"taskthrottle_{name}") for name in names}
        given = {name: value for name, value in found.items() if value is not None}
        return cls(**(given | overrides))


class State:
    """What one integration holds: settings, and a limiter and deferrals made once per
    process. ``parking`` makes the Redis client that parked tasks live in (the broker's,
    where the broker is Redis); None parks them beside the limiter's state. ``app`` names
    whose parked tasks they are: a worker releases its own app's only."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter | Callable[[], Limiter] | None,
        parking: Callable[[], Any] | None = None,
        app: str = "default",
    ):
        self.settings = settings
        self._source = limiter
        self._limiter: Limiter | None = None
        self._parking = parking
        self._app = app
        self._deferrals: Deferrals | None = None
        self.default: tuple[Throttle, ...] = ()
        if settings.default:
            default = dict(settings.default)
            limits = default.pop("limits", ())
            key, consume = default.pop("key", None), default.pop("consume", None)
            breaker = default.pop("breaker", None)
            strategy = default.pop("strategy", "token_bucket")
            spec = throttle_spec(tuple(limits), key, consume, default, breaker, strategy)
            self.default = (spec,)
        if isinstance(limiter, Limiter):
            self._limiter = self._configure(limiter)

    def limiter(self) -> Limiter:
        """This process's limiter, made on first use (so after a prefork worker forks)."""
        if self._limiter is None:
            if callable(self._source):
                made = self._source()
            elif self.settings.redis_url:
                from taskthrottle._redis import RedisStore

                url = self.settings.redis_url
                made = Limiter(RedisStore.from_url(url, namespace=self.namespace()))
            else:
                made = Limiter()
            self._limiter = self._configure(made)
        return self._limiter

    def _configure(self, limiter: Limiter) -> Limiter:
        """The integration's store-failure settings, passed on to the limiter."""
        settings = self.settings
        if settings.on_store_error is not None:
            limiter.on_store_error = check_policy(settings.on_store_error, settings.local_share)
            limiter.local_share = settings.local_share
            limiter.store_retry = settings.store_retry
        return limiter

    def namespace(self) -> str:
        """The namespace of limits built from ``redis_url``, and of parked tasks beside a
        store that is not Redis: the setting, else one of the app's own."""
        return self.settings.namespace or f"taskthrottle.{self._app}"

    def parking_unset(self) -> bool:
        """True until an integration said where to park (before the first deferral)."""
        return self._parking is None and self._deferrals is None

    def park_with(self, parking: Callable[[], Any], app: str) -> None:
        """Where parked tasks live, and whose they are, as `State` takes them; before the
        first deferral."""
        self._parking, self._app = parking, app

    def deferrals(self) -> Deferrals:
        """Parking and run tokens: in the broker's Redis when ``parking`` gives one."""
        if self._deferrals is None:
            client = None if self._parking is None else self._parking()
            store, namespace = self.limiter().store, self.namespace()
            self._deferrals = deferrals_for(store, client, namespace, self._app)
        return self._deferrals
