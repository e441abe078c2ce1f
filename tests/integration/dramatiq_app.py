"""The Dramatiq app the integration tests run in real worker processes (env-configured:
TT_REDIS, TT_NS, TT_QUEUE, TT_RATE, TT_BURST, TT_BROKER=rabbitmq for RabbitMQ)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, GroupCallbacks
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.rate_limits.backends import RedisBackend as BarrierBackend
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from taskthrottle import Breaker, Limit, Limiter, RedisStore, current_lease, throttled
from taskthrottle.dramatiq import ThrottleMiddleware

REDIS = os.environ.get("TT_REDIS", "redis://127.0.0.1:6379/9")
NS = os.environ.get("TT_NS", "tt-dramatiq")
QUEUE = os.environ.get("TT_QUEUE", "tt-dramatiq")
RATE = float(os.environ.get("TT_RATE", "20"))
BURST = float(os.environ.get("TT_BURST", os.environ.get("TT_RATE", "20")))

if os.environ.get("TT_BROKER") == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: dramatiq.Broker = RabbitmqBroker(url="amqp://guest:guest@127.0.0.1:5672/")
else:
    broker = RedisBroker(
        url=REDIS,
        namespace=f"{NS}-dramatiq",
        heartbeat_timeout=int(os.environ.get("TT_HEARTBEAT", "60000")),
        maintenance_chance=int(os.environ.get("TT_MAINTENANCE", "1000")),
    )
broker.add_middleware(Results(backend=RedisBackend(url=REDIS, namespace=f"{NS}-results")))
# Completion callbacks of groups; their barriers are keyed by a UUID (the tests delete them).
broker.add_middleware(GroupCallbacks(BarrierBackend(url=REDIS), barrier_ttl=600_000))
LEASE_TTL = float(os.environ.get("TT_LEASE_TTL", "300"))
broker.add_middleware(
    ThrottleMiddleware(
        lambda: Limiter(RedisStore.from_url(REDIS, namespace=NS), lease_ttl=LEASE_TTL), horizon=120
    )
)
dramatiq.set_broker(broker)
_log = redis.Redis.from_url(REDIS)


def record(kind: str, message_id: str, extra: str = "") -> None:
    """Append an event to the test's journal."""
    _log.rpush(f"{NS}:journal", f"{kind} {message_id} {time.time():.6f} {extra}")


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=1,
    throttle={"rps": RATE, "key": "shared"},
)
def limited(n: int) -> int:
    """One fleet-wide limit from the actor option; records its start and retries."""
    message = dramatiq.middleware.CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message else "?"
    record("start", message.message_id if message else "?", f"retries={retries}")
    return n * 2


SLOW = Limit.per_second("slow", float(os.environ.get("TT_SLOW_RATE", "1")), burst=1)


@dramatiq.actor(queue_name=QUEUE, throttle={"limits": [SLOW], "key": "far"})
def far(n: int) -> None:
    """Turns far apart: waiting copies are parked in Redis."""
    message = dramatiq.middleware.CurrentMessage.get_current_message()
    record("start", message.message_id if message else "?")


@dramatiq.actor(queue_name=QUEUE, store_results=True, throttle={"concurrency": 1, "key": "guarded"})
def guarded(n: int) -> int:
    """One at a time; with TT_HANG_MARKER the first run hangs until the test kills it."""
    message = dramatiq.middleware.CurrentMessage.get_current_message()
    record("start", message.message_id if message else "?", f"pid={os.getpid()}")
    marker = os.environ.get("TT_HANG_MARKER")
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(120)
    return n


@dramatiq.actor(queue_name=QUEUE, store_results=True)
@throttled(tpm=60_000, key="tenant:{tenant}", consume={"tpm": lambda tenant, words: words})
def llm(tenant: str, words: int) -> dict[str, float]:
    """The decorator form, and an adjustment through current_lease()."""
    lease = current_lease()
    assert lease is not None
    lease.adjust(tpm=words // 2)
    return lease.consumed


class _Deliveries(dramatiq.Middleware):
    """Counts every delivery, deferred ones included."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        record("delivery", message.message_id)


broker.add_middleware(_Deliveries(), before=ThrottleMiddleware)
broker.add_middleware(dramatiq.middleware.CurrentMessage())


# Actors of tests/integration/test_dramatiq_features.py: Dramatiq's own features through
# deferrals. Each test gives every feature a key of its own ("feat:<key>"), under TT_RATE and
# TT_BURST. None may be retried: a deferral counted as a retry would lose its message.
FEATURE = Limit.per_second("feat", RATE, burst=BURST)
FEATURE_THROTTLE = {"limits": [FEATURE], "key": "feat:{key}"}


def _started(key: str) -> str:
    """Journal the start of the current message; returns its id."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    extra = f"key={key} retries={message.options.get('retries', 0)}"
    group = message.options.get("group_completion_uuid")
    record("start", message.message_id, extra + (f" group={group}" if group else ""))
    return message.message_id


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0, throttle=FEATURE_THROTTLE)
def step(key: str, n: int) -> int:
    """Returns n * 2 (a pipeline passes it on as the next step's n)."""
    _started(key)
    return n * 2


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0, throttle=FEATURE_THROTTLE)
def failing(key: str, n: int) -> int:
    """Always raises ValueError."""
    _started(key)
    raise ValueError(f"failing {key}/{n} fails on purpose")


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0, throttle=FEATURE_THROTTLE)
def timed(key: str, n: int, hold: bool = False) -> int:
    """Returns n at once, or with ``hold`` runs until its time limit interrupts it: -n."""
    message_id = _started(key)
    if not hold:
        return n
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.02)
    except TimeLimitExceeded:
        record("interrupted", message_id)
        return -n
    return n


@dramatiq.actor(queue_name=QUEUE)
def succeeded(message_data: dict[str, Any], result: Any) -> None:
    """An on_success callback: records the message it followed and its result."""
    record("on_success", message_data["message_id"], str(result))


@dramatiq.actor(queue_name=QUEUE)
def failed(message_data: dict[str, Any], exception_data: dict[str, Any]) -> None:
    """An on_failure callback: records the message it followed and its exception type."""
    record("on_failure", message_data["message_id"], exception_data["type"])


@dramatiq.actor(queue_name=QUEUE)
def completed(key: str) -> None:
    """A group's completion callback: records that it ran."""
    message = CurrentMessage.get_current_message()
    record("completed", message.message_id if message else "?", f"key={key}")


# The breaker test (tests/integration/test_breakers.py): a callee that fails while the key
# "<NS>:callee-down" exists, behind a breaker every worker process shares.
CALLEE = Breaker(
    "callee",
    Limiter(RedisStore.from_url(REDIS, namespace=NS)),
    failure_threshold=3,
    recovery_timeout=1.0,
    failure_exceptions=(ConnectionError,),
)


@CALLEE
def call_callee(n: int) -> int:
    if _log.exists(f"{NS}:callee-down"):
        raise ConnectionError("callee down")
    return n


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=100,
    min_backoff=200,
    max_backoff=200,
    throttle={"rps": 100, "key": "callee", "breaker": "callee"},
)
def via_breaker(n: int) -> int:
    """Calls the callee; a failed call is retried by Retries (a real failure, counted), a
    call refused by the breaker is the middleware's to reschedule (never counted)."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    record("start", message.message_id, f"retries={message.options.get('retries', 0)}")
    try:
        result = call_callee(n)
    except ConnectionError:
        record("failed", message.message_id)
        raise
    record("done", message.message_id)
    return result
