"""The Celery app the integration tests run in real worker processes.

Configured by environment variables so that each test gives its workers their own queue,
key prefix and limits: TT_REDIS (base URL), TT_NS (prefix), TT_QUEUE, TT_RATE, TT_BURST.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import redis
from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded

import taskthrottle.celery
from taskthrottle import Breaker, Limit, Limiter, RedisStore, current_lease, throttled

REDIS = os.environ.get("TT_REDIS", "redis://127.0.0.1:6379/9")
NS = os.environ.get("TT_NS", "tt-celery")
QUEUE = os.environ.get("TT_QUEUE", "tt-celery")
RATE = float(os.environ.get("TT_RATE", "20"))
BURST = float(os.environ.get("TT_BURST", os.environ.get("TT_RATE", "20")))

app = Celery("tt_test", broker=os.environ.get("TT_BROKER", REDIS), backend=REDIS)
VISIBILITY = float(os.environ.get("TT_VISIBILITY", "3600"))
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{NS}:kombu:", "visibility_timeout": VISIBILITY},
    result_backend_transport_options={"global_keyprefix": f"{NS}:results:"},
    worker_prefetch_multiplier=4,
    task_acks_late=os.environ.get("TT_ACKS_LATE") == "1",
    task_reject_on_worker_lost=os.environ.get("TT_ACKS_LATE") == "1",
    broker_connection_retry_on_startup=True,
    task_track_started=os.environ.get("TT_TRACK_STARTED") == "1",
)
LEASE_TTL = float(os.environ.get("TT_LEASE_TTL", "300"))
taskthrottle.celery.install(
    app,
    lambda: Limiter(RedisStore.from_url(REDIS, namespace=NS), lease_ttl=LEASE_TTL),
    horizon=120.0,
    on_failure=os.environ.get("TT_ON_FAILURE", "keep"),
)
_log = redis.Redis.from_url(REDIS)


def record(kind: str, task_id: str, extra: str = "") -> None:
    """Append an event to the test's journal: kind, task id, time, extra."""
    _log.rpush(f"{NS}:journal", f"{kind} {task_id} {time.time():.6f} {extra}")


@app.task(bind=True, shared=False)
@throttled(Limit.per_second("rps", RATE, burst=BURST), key="shared")
def limited(self: object, n: int) -> int:
    """A task under one fleet-wide limit: records its start, its retries, returns n * 2."""
    request = self.request  # type: ignore[attr-defined]
    record("start", request.id, f"retries={request.retries}")
    return n * 2


@app.task(bind=True, shared=False)
@throttled(Limit.per_second("slow", float(os.environ.get("TT_SLOW_RATE", "1")), burst=1), key="far")
def far(self: object, n: int) -> int:
    """A task whose turns lie far apart: most copies wait parked in Redis."""
    record("start", self.request.id)  # type: ignore[attr-defined]
    return n


@app.task(bind=True, shared=False)
@throttled(concurrency=1, tpd=60_000, key="guarded", consume={"tpd": 100})
def guarded(self: object, n: int, fail: bool = False) -> int:
    """One at a time; a failing call raises after its slot and tokens were taken."""
    record("start", self.request.id, f"pid={os.getpid()}")  # type: ignore[attr-defined]
    if fail:
        raise ValueError(f"task {n} fails on purpose")
    if os.environ.get("TT_HANG_MARKER") and not os.path.exists(os.environ["TT_HANG_MARKER"]):
        Path(os.environ["TT_HANG_MARKER"]).touch()
        time.sleep(120)  # killed by the test long before this ends
    return n


@app.task(bind=True, shared=False)
@throttled(tpm=60_000, key="tenant:{tenant}", consume={"tpm": lambda tenant, words: words})
def llm(self: object, tenant: str, words: int) -> dict[str, float]:
    """Adjusts its lease as an LLM task reports real use; returns what the lease holds."""
    lease = current_lease()
    assert lease is not None
    lease.adjust(tpm=words // 2)
    return lease.consumed


@app.task(bind=True, shared=False, max_retries=5)
@throttled(Limit.per_second("rtr", RATE, burst=BURST), key="retrying")
def retrying(self: object, n: int, times: int) -> int:
    """Retries itself ``times`` times (as after a 429); records each attempt's lease id."""
    request = self.request  # type: ignore[attr-defined]
    lease = current_lease()
    record("start", request.id, f"lease={lease.id if lease else None}")
    if request.retries < times:
        raise self.retry(countdown=0.05)  # type: ignore[attr-defined]
    return n


@signals.task_postrun.connect(weak=False, dispatch_uid="tt-test-postrun")
def _count_postrun(task_id: str, task: object, state: str | None = None, **_: object) -> None:
    """Every delivery ends here, a deferred one with state IGNORED."""
    record("postrun", task_id, str(state))


@signals.task_prerun.connect(weak=False, dispatch_uid="tt-test-deliveries")
def _count_delivery(task_id: str, task: object, **_: object) -> None:
    """Every delivery passes here, deferred ones included."""
    record("delivery", task_id)


_IN_WORKER = "worker" in sys.argv  # faults are injected in worker processes only
_CRASH_MARKER = os.environ.get("TT_CRASH_AFTER_DEFER")
if _CRASH_MARKER and _IN_WORKER:
    # Kill the worker process once, after a deferred copy is published and before the
    # original is acknowledged: the broker then redelivers the original.
    from celery.exceptions import Ignore

    from taskthrottle.celery import _gate

    # Keep the original across reloads of this module (the tests reload it per fleet).
    _publish_and_skip = getattr(_gate, "_tt_original_defer", _gate._defer)
    _gate._tt_original_defer = _publish_and_skip  # type: ignore[attr-defined]
    _marker: str = _CRASH_MARKER

    def _defer_then_crash(*args: object, **kwargs: object) -> object:
        try:
            return _publish_and_skip(*args, **kwargs)  # type: ignore[arg-type]
        except Ignore:
            if not os.path.exists(_marker):
                Path(_marker).touch()
                os._exit(1)
            raise

    _gate._defer = _defer_then_crash  # type: ignore[assignment]


_FAIL_MARKER = os.environ.get("TT_FAIL_PUBLISH_ONCE")
if _FAIL_MARKER and _IN_WORKER:
    # The broker refuses the first deferred copy, as if it were down for a moment.
    from celery.canvas import Signature

    _apply_async = getattr(Signature, "_tt_original_apply_async", Signature.apply_async)
    Signature._tt_original_apply_async = _apply_async
    _fail_marker: str = _FAIL_MARKER

    def _refuse_once(self: Signature, *args: object, **kwargs: object) -> object:
        if not os.path.exists(_fail_marker):
            Path(_fail_marker).touch()
            raise ConnectionError("broker down (simulated)")
        return _apply_async(self, *args, **kwargs)

    setattr(Signature, "apply_async", _refuse_once)  # noqa: B010  (Celery is untyped here)


@app.task(bind=True, shared=False)
def note(self: object, value: object) -> None:
    """A link callback: records that it ran, with the value it was given."""
    record("callback", self.request.id, str(value))  # type: ignore[attr-defined]


# Tasks of tests/integration/test_celery_features.py: Celery's own features through deferrals.
# Each test gives every feature a key of its own ("feat:<key>"), under TT_RATE and TT_BURST.
FEATURE = Limit.per_second("feat", RATE, burst=BURST)


@app.task(bind=True, shared=False)
@throttled(FEATURE, key="feat:{key}")
def work(self: object, key: str, n: int, fail: bool = False) -> int:
    """Records its start with the queue and priority of the delivery that runs it; returns
    n * 2, or raises ValueError when ``fail``."""
    request = self.request  # type: ignore[attr-defined]
    info = request.delivery_info or {}
    where = f"key={key} queue={info.get('routing_key')} priority={info.get('priority')}"
    record("start", request.id, where)
    if fail:
        raise ValueError(f"work {key}/{n} fails on purpose")
    return n * 2


@app.task(bind=True, shared=False)
@throttled(FEATURE, key="feat:{key}")
def hold(self: object, key: str, n: int) -> int:
    """Runs until its soft time limit interrupts it: returns n then, -1 if it never came."""
    task_id = self.request.id  # type: ignore[attr-defined]
    record("begun", task_id)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.02)
    except SoftTimeLimitExceeded:
        record("soft", task_id)
        return n
    return -1


@app.task(bind=True, shared=False)
def collect(self: object, results: list[int]) -> list[int]:
    """A chord callback: records the header results it was given."""
    record("chord", self.request.id, ",".join(map(str, results)))  # type: ignore[attr-defined]
    return results


@app.task(bind=True, shared=False)
def linked(self: object, value: object) -> None:
    """A link callback: records the task it followed (its parent) and the value it got."""
    record("linked", str(self.request.parent_id), str(value))  # type: ignore[attr-defined]


@app.task(shared=False)  # unbound: Celery calls a bound errback with the task id alone
def errlinked(request: object, exc: BaseException, traceback: object) -> None:
    """A link_error callback: records the failed task and its exception."""
    record("errlinked", str(request.id), type(exc).__name__)  # type: ignore[attr-defined]


class Handled(Task):  # type: ignore[misc]  # Celery's Task is untyped
    """A task class with handlers of its own (gated when the app is finalized)."""

    def on_success(self, retval: object, task_id: str, args: object, kwargs: object) -> None:
        record("on_success", task_id, str(retval))

    def on_failure(
        self, exc: BaseException, task_id: str, args: object, kwargs: object, einfo: object
    ) -> None:
        record("on_failure", task_id, type(exc).__name__)

    def after_return(
        self,
        status: str,
        retval: object,
        task_id: str,
        args: object,
        kwargs: object,
        einfo: object,
    ) -> None:
        record("after_return", task_id, status)


@app.task(bind=True, shared=False, base=Handled)
@throttled(FEATURE, key="feat:{key}")
def handled(self: object, key: str, n: int, fail: bool = False) -> int:
    """A throttled task of the class above: n * 2, or ValueError when ``fail``."""
    record("start", self.request.id, f"key={key}")  # type: ignore[attr-defined]
    if fail:
        raise ValueError(f"handled {key}/{n} fails on purpose")
    return n * 2


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


@app.task(bind=True, shared=False, max_retries=100)
@throttled(rps=100, key="callee", breaker="callee")
def via_breaker(self: object, n: int) -> int:
    """Calls the callee; a failed call is retried by the task (a real failure, counted),
    a call refused by the breaker is the gate's to reschedule (never counted)."""
    request = self.request  # type: ignore[attr-defined]
    record("start", request.id, f"retries={request.retries}")
    try:
        result = call_callee(n)
    except ConnectionError as exc:
        record("failed", request.id)
        raise self.retry(countdown=0.2, exc=exc) from exc  # type: ignore[attr-defined]
    record("done", request.id)
    return result
