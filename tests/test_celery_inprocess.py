"""The Celery integration without worker processes: eager mode, the memory transport,
settings, helpers."""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from celery import Celery, Task
from celery.contrib.testing.worker import start_worker

import taskthrottle.celery
from taskthrottle import InvalidInput, Limit, Limiter, Throttled, current_lease, throttled
from taskthrottle.celery import Settings, delay_for, limiter_for
from taskthrottle.testing import memory_limiter
from tests.helpers import wait_for


def make_app(**conf: Any) -> Celery:
    app = Celery("inproc", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(**conf)
    return app


def test_eager_waits_for_the_turn_and_returns_the_result() -> None:
    """task_always_eager: each call waits inline for its turn; callers get real results."""
    app = make_app(task_always_eager=True)
    taskthrottle.celery.install(app, memory_limiter())

    @app.task(shared=False)
    @throttled(Limit.per_second("rps", 20, burst=1), key="eager")
    def double(n: int) -> int:
        lease = current_lease()
        assert lease is not None and lease.consumed == {"rps": 1.0}
        return 2 * n

    start = time.monotonic()
    assert [double.delay(i).get() for i in range(4)] == [0, 2, 4, 6]
    assert time.monotonic() - start >= 0.15 - 0.01  # three turns 50 ms apart
    assert current_lease() is None


def test_eager_bypass_runs_at_once() -> None:
    """eager="bypass" skips the throttle in eager mode."""
    app = make_app(task_always_eager=True)
    limiter = memory_limiter()
    taskthrottle.celery.install(app, limiter, eager="bypass")

    @app.task(shared=False)
    @throttled(Limit.per_hour("rph", 1), key="bypass")
    def job() -> str:
        return "ran"

    assert [job.delay().get() for _ in range(3)] == ["ran"] * 3
    assert limiter.available("bypass", [Limit.per_hour("rph", 1)]) == {"rph": 1.0}


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    """An app on the memory transport with an in-process (threads) worker."""
    app = make_app(task_default_queue="inproc")
    taskthrottle.celery.install(app, memory_limiter(), park_after=60)
    yield app


def test_memory_transport_defers_and_delivers(memory_app: Celery) -> None:
    """With memory://, throttled tasks are deferred through the broker and all run."""
    started: list[float] = []

    @memory_app.task(shared=False)
    @throttled(Limit.per_second("rps", 10, burst=1), key="mem")
    def tick(n: int) -> int:
        started.append(time.monotonic())
        return n

    with start_worker(memory_app, pool="threads", concurrency=2, perform_ping_check=False):
        results = [tick.delay(i) for i in range(5)]
        assert [r.get(timeout=20) for r in results] == list(range(5))
    assert len(started) == 5
    started.sort()
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert sum(gaps) >= 0.4 - 0.05  # four turns 100 ms apart


def test_default_throttle_from_conf() -> None:
    """taskthrottle_default in app.conf throttles every task that has none of its own."""
    app = make_app(task_always_eager=True, taskthrottle_default={"rph": 2})
    limiter = memory_limiter()
    taskthrottle.celery.install(app, limiter)

    @app.task(name="plain", shared=False)
    def plain() -> str:
        return "ok"

    assert plain.delay().get() == "ok"
    assert limiter.available("plain", [Limit.per_hour("rph", 2)]) == {"rph": 1.0}
    assert delay_for(plain) == 0.0
    plain.delay().get()
    assert delay_for(plain) == pytest.approx(1800, abs=1)


def test_settings_from_conf_and_bad_values() -> None:
    """Settings come from app.conf; bad values are refused by name."""
    assert Settings.from_conf({"taskthrottle_horizon": 30}).horizon == 30
    with pytest.raises(InvalidInput, match="on_failure"):
        Settings(on_failure="forget")
    with pytest.raises(InvalidInput, match="horizon"):
        Settings(horizon=-1)
    with pytest.raises(InvalidInput, match="bogus"):
        Settings.from_conf({}, bogus=1)


def test_limiter_from_conf_redis_url(redis_url: str, namespace: str) -> None:
    """Without a limiter, install builds one from taskthrottle_redis_url."""
    app = make_app(taskthrottle_redis_url=redis_url, taskthrottle_namespace=namespace)
    taskthrottle.celery.install(app)
    store = limiter_for(app).store
    assert type(store).__name__ == "RedisStore"


def test_install_required() -> None:
    """A helper on an app without install() says what is missing."""
    with pytest.raises(InvalidInput, match="install"):
        limiter_for(make_app())


def test_metrics_count_one_request_per_task() -> None:
    """Through a worker, each task is one request: a deferred copy that comes back for its
    turn books nothing more."""
    from prometheus_client import CollectorRegistry

    from taskthrottle import Limiter, MemoryStore
    from taskthrottle.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    app = make_app(task_default_queue="metrics")
    taskthrottle.celery.install(
        app, Limiter(MemoryStore(), metrics=PrometheusMetrics(registry)), park_after=60
    )

    @app.task(shared=False)
    @throttled(Limit.per_second("rps", 10, burst=1), key="metrics")
    def tick(n: int) -> int:
        return n

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        results = [tick.delay(i) for i in range(5)]
        assert [r.get(timeout=20) for r in results] == list(range(5))

    def count(outcome: str) -> float:
        found = registry.get_sample_value("taskthrottle_requests_total", {"outcome": outcome})
        return found or 0.0

    assert count("granted") + count("delayed") == 5
    assert count("throttled") == 0


def test_install_takes_a_redis_url(redis_url: str) -> None:
    """install(app, "redis://...") keeps the limits in that Redis, never silently in a
    per-process memory store; a URL redis-py cannot use is refused at once."""
    from taskthrottle import RedisStore

    app = make_app()
    taskthrottle.celery.install(app, redis_url, namespace="install-url")
    assert isinstance(limiter_for(app).store, RedisStore)
    with pytest.raises(InvalidInput, match="bad Redis URL"):
        taskthrottle.celery.install(make_app(), "redis://127.0.0.1:notaport/0")


def test_the_store_error_policy_passes_to_the_limiter() -> None:
    """on_store_error and its companions given to install reach the app's limiter."""
    app = make_app()
    limiter = memory_limiter()
    taskthrottle.celery.install(app, limiter, on_store_error="local", local_share=0.25)
    assert (limiter.on_store_error, limiter.local_share) == ("local", 0.25)
    with pytest.raises(InvalidInput, match="needs local_share"):
        taskthrottle.celery.install(make_app(), memory_limiter(), on_store_error="local")


def three_deliveries(
    limit: Limit, send: Callable[[Any, int], None]
) -> tuple[list[int], list[str], Limiter]:
    """Three sends (``send(task, n)``) of a task throttled by ``limit`` through a worker:
    which bodies ran, how each delivery ended, and the limiter."""
    from celery import signals

    app = make_app(task_default_queue=f"three-{limit.name}")
    limiter = memory_limiter()
    taskthrottle.celery.install(app, limiter)
    ran: list[int] = []
    ended: list[str] = []

    @app.task(shared=False)
    @throttled(limit, key="three")
    def job(n: int) -> None:
        ran.append(n)

    def postrun(state: str, **_: Any) -> None:
        ended.append(state)

    signals.task_postrun.connect(postrun, sender=job, weak=False)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            for n in range(3):
                send(job, n)
            wait_for(lambda: len(ended) >= 3, 20, "three deliveries to end")
    finally:
        signals.task_postrun.disconnect(postrun, sender=job)
    return ran, sorted(ended), limiter


def test_a_forged_reservation_header_is_charged() -> None:
    """A task published with a made-up reservation in its taskthrottle header is charged
    like a first delivery: of three on a limit of one an hour, one runs, two are deferred."""

    def forge(task: Any, n: int) -> None:
        forged = {"lease": f"forged-{n}", "due": time.time(), "token": f"t{n}"}
        task.apply_async((n,), headers={"taskthrottle": forged})

    rph = Limit.per_hour("rph", 1)
    ran, ended, limiter = three_deliveries(rph, forge)
    assert len(ran) == 1
    assert ended == ["IGNORED", "IGNORED", "SUCCESS"]
    assert limiter.available("three", [rph])["rph"] < 0.01


class Planted:
    """What an attacker with write access to the parking Redis would plant: unpickling it
    runs code (here, it only records that it ran)."""

    ran: ClassVar[list[str]] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (Planted.ran.append, ("pwned",))


def test_parked_tasks_are_read_only_in_accepted_content() -> None:
    """A pickle planted among the parked tasks of an app that accepts JSON only is never
    unpickled: it is set aside, and the good task claimed with it is published."""
    from kombu.serialization import dumps

    from taskthrottle.celery import release_due
    from taskthrottle.celery._gate import encode, state_of

    app = make_app(accept_content=["json"])
    taskthrottle.celery.install(app, memory_limiter())
    deferrals = state_of(app).deferrals()
    content_type, encoding, body = dumps(Planted(), serializer="pickle")  # type: ignore[no-untyped-call]
    deferrals.park("planted", 0, f"{content_type}\n{encoding}\n".encode() + body)
    good = app.signature("inproc.noop", args=(1,)).set(queue="parked")
    deferrals.park("good", 0, encode(app, dict(good)))
    assert release_due(app) == 1
    assert Planted.ran == []
    assert set(deferrals.set_aside) == {"planted"}  # type: ignore[attr-defined]


def test_passwords_stay_out_of_inspect_conf_and_reprs() -> None:
    """A password in taskthrottle_redis_url reaches the store, not Celery's censored
    configuration (what `celery inspect conf` prints) nor the settings' repr."""
    from celery.app.utils import filter_hidden_settings

    app = make_app(taskthrottle_redis_url="redis://limiter:UserPass9@127.0.0.1:6379/9")
    taskthrottle.celery.install(app)
    shown = repr(filter_hidden_settings(app.conf.table(with_defaults=False)))
    assert "UserPass9" not in shown and "taskthrottle_redis_url" in shown
    assert "UserPass9" not in repr(Settings.from_conf(app.conf, redis_url="redis://a:UserPass9@h"))
    store = limiter_for(app).store
    assert store.client.connection_pool.connection_kwargs["password"] == "UserPass9"  # type: ignore[attr-defined]


def test_the_horizon_is_bounded() -> None:
    """No task books its turn more than an hour ahead."""
    with pytest.raises(InvalidInput, match="horizon must be at most 3600"):
        Settings(horizon=86_400)


def test_each_app_has_its_own_namespace_and_parking(redis_url: str) -> None:
    """Two apps on one Redis keep their limits and parked tasks apart unless told to share:
    one never claims the other's parked tasks."""
    billing = Celery("billing", broker=redis_url, set_as_current=False)
    other = Celery("other", broker=redis_url, set_as_current=False)
    for app in (billing, other):
        taskthrottle.celery.install(app, redis_url)
    stores = [limiter_for(app).store for app in (billing, other)]
    assert [repr(s).split("namespace=")[1] for s in stores] == [
        "'taskthrottle.celery.billing')",
        "'taskthrottle.celery.other')",
    ]
    from taskthrottle.celery._gate import state_of

    billing_parking, other_parking = (state_of(app).deferrals() for app in (billing, other))
    billing_parking.park(f"charge-{time.time_ns()}", 0, b"x")
    assert other_parking.claim(lead=1, batch=10, hold=1).parked == []
    claimed = billing_parking.claim(lead=1, batch=10, hold=1).parked
    assert len(claimed) == 1
    client = stores[0].client  # type: ignore[attr-defined]
    client.delete(*client.keys("{taskthrottle.celery.billing}:*"))


def test_a_task_id_delivered_again_runs_once() -> None:
    """Three messages with one task id (a producer reusing an id, or a lost acknowledgement
    redelivering a task that ran): the task runs once; the others are dropped, not replayed
    for free."""
    rph = Limit.per_hour("rph10", 10)
    ran, ended, limiter = three_deliveries(
        rph, lambda task, n: task.apply_async((n,), task_id="same")
    )
    assert ran == [0]
    assert ended == ["IGNORED", "IGNORED", "SUCCESS"]
    left = limiter.available("three", [rph])["rph10"]
    assert 9 <= left < 9.5  # charged once (and refilled a little since)


def test_a_deferral_logs_one_info_line_without_arguments() -> None:
    """Each deferral says, at INFO on taskthrottle.celery, which task waits, how long and
    for which key and limit, never the task's arguments. (A handler of its own: a Celery
    worker takes the root logger's over.)"""
    import logging

    app = make_app(task_default_queue="logs")
    taskthrottle.celery.install(app, memory_limiter())
    done: list[str] = []
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    logger = logging.getLogger("taskthrottle.celery")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    @app.task(shared=False)
    @throttled(Limit.per_second("rps", 4, burst=1), key="logs")
    def summarize(prompt: str) -> None:
        done.append(prompt)

    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            summarize.delay("secret prompt one")
            summarize.delay("secret prompt two")
            wait_for(lambda: len(done) >= 2, 20, "both tasks")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert len(records) == 1 and records[0].levelname == "INFO", records
    assert ".summarize[" in records[0].getMessage() and "logs/rps" in records[0].getMessage()
    assert "secret prompt" not in records[0].getMessage()


def held_after_a_refusal(
    monkeypatch: pytest.MonkeyPatch, *, stray_runs: bool
) -> tuple[Celery, Any, list[str | None], list[int]]:
    """A task whose body a breaker refuses once, and whose hand-back then fails: the
    publish raised, but (``stray_runs``) its copy got out and started all the same.
    Returns the app, the task, the maker each hand-back named, and the body's runs."""
    from celery.exceptions import Ignore

    from taskthrottle import Breaker, BreakerOpen
    from taskthrottle.celery import _gate

    app = make_app()
    taskthrottle.celery.install(app, memory_limiter(), park_after=60, jitter=0.0)
    name = f"held-{uuid.uuid4().hex[:8]}"
    Breaker(name, memory_limiter())
    priors: list[str | None] = []
    runs: list[int] = []

    def lost_reply(task: Any, state: Any, turn: Any, prior: str | None) -> None:
        priors.append(prior)
        if len(priors) > 1:
            raise Ignore()  # handed back this time
        if stray_runs:  # the copy reached the broker, and a worker started it
            assert state.deferrals().begin(task.request.id, "stray-token", prior)

    monkeypatch.setattr(_gate, "_defer", lost_reply)

    @app.task(shared=False)
    @throttled(Limit.per_hour("rph", 10), key="held", breaker=name)
    def job() -> str:
        runs.append(1)
        raise BreakerOpen(name, 0.001, "open")

    return app, job, priors, runs


def run_delivery(task: Any) -> None:
    """Run ``task`` as a worker runs a first delivery of it (the tracer's request)."""
    from celery.exceptions import Ignore

    task.push_request(
        id="t-held", retries=0, is_eager=False, called_directly=False, delivery_info={}
    )
    try:
        with pytest.raises(Ignore):
            task()
    finally:
        task.pop_request()


def test_a_body_refusal_whose_copy_ran_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A breaker refuses the body, the hand-back raises, but its copy ran: the delivery is
    dropped, not run again beside it, and its grant is given back."""
    app, job, priors, runs = held_after_a_refusal(monkeypatch, stray_runs=True)
    run_delivery(job)
    assert (priors, len(runs)) == ([None], 1)
    rph = Limit.per_hour("rph", 10)
    assert limiter_for(app).available("held", [rph]) == {"rph": 10.0}


def test_a_body_refusal_held_here_takes_the_task_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy did not get out: the delivery takes the task over and runs its body again;
    its next hand-back names the take-over's mark as its maker."""
    _, job, priors, runs = held_after_a_refusal(monkeypatch, stray_runs=False)
    run_delivery(job)
    assert (priors, len(runs)) == ([None, "body:"], 2)


def test_autoretry_never_retries_a_body_refusal() -> None:
    """With autoretry_for=(Exception,), a breaker that refuses the body's call hands the
    task back through the gate: no retry is published nor counted (the next delivery is
    still attempt 0), and the task completes once the breaker lets a probe through."""
    from taskthrottle import Breaker, MemoryStore
    from taskthrottle.testing import ManualClock

    class Refusals:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def granted(self, delay: float) -> None: ...
        def throttled(self, exc: Exception) -> None: ...
        def failed(self, exc: Exception) -> None: ...

        def breaker_refused(self, breaker: str) -> None:
            self.seen.append(breaker)

    clock, refusals = ManualClock(), Refusals()
    limiter = Limiter(MemoryStore(clock=clock), metrics=refusals)
    app = make_app(task_default_queue="inproc-autoretry")
    taskthrottle.celery.install(app, limiter, park_after=60, jitter=0.0)
    name = f"autoretry-{uuid.uuid4().hex[:8]}"
    breaker = Breaker(name, limiter, failure_threshold=1, recovery_timeout=0.05)
    attempts: list[int] = []

    @app.task(shared=False, autoretry_for=(Exception,), retry_kwargs={"countdown": 0})
    @throttled(Limit.per_hour("rph", 100), key="autoretry", breaker=name)
    def job() -> str:
        attempts.append(job.request.retries)
        if len(attempts) == 1:  # the callee fails once: the breaker opens under the body
            with contextlib.suppress(ConnectionError), breaker:
                raise ConnectionError("callee down")
        return breaker.call(lambda: "ok")

    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
        result = job.delay()
        wait_for(lambda: bool(refusals.seen), 10, "the breaker to refuse the body's call")
        clock.advance(0.05)  # half-open: the next delivery's probe closes it
        assert result.get(timeout=10) == "ok"
    assert attempts == [0, 0]


@pytest.mark.parametrize("options", [{"dont_autoretry_for": (KeyError,)}, {"base": Task}])
def test_tasks_of_their_own_spare_refusals_from_autoretry(options: dict[str, Any]) -> None:
    """A task with a dont_autoretry_for of its own, or a base class of its own, has
    Throttled added to it when the app is finalized, and keeps what it said."""
    app = make_app()
    taskthrottle.celery.install(app, memory_limiter())

    @app.task(shared=False, autoretry_for=(Exception,), **options)
    def job() -> None: ...

    app.finalize()
    spared = app.tasks[job.name].dont_autoretry_for
    assert Throttled in spared
    assert KeyError in spared or "base" in options
