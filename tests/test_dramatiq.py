"""The Dramatiq middleware on the StubBroker: the pitfalls of skipping and re-enqueueing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit
from dramatiq.results import Results
from dramatiq.results.backends.stub import StubBackend

from taskthrottle import (
    InvalidInput,
    Limit,
    Limiter,
    MemoryStore,
    StoreError,
    current_lease,
    throttled,
)
from taskthrottle.dramatiq import ThrottleMiddleware, _throttles_of
from taskthrottle.testing import ManualClock
from tests.helpers import wait_for


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    broker.add_middleware(Results(backend=StubBackend()))
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)
    yield broker
    broker.flush_all()
    broker.close()


def start(broker: StubBroker) -> dramatiq.Worker:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    return worker


def test_results_wait_for_the_real_value(broker: StubBroker) -> None:
    """A deferred delivery stores no result: the caller gets the value of the run, not None."""
    ran: list[int] = []
    middleware = ThrottleMiddleware(Limiter(MemoryStore()))
    broker.add_middleware(middleware)

    @dramatiq.actor(store_results=True, throttle={"rps": 10, "key": "r"})
    def double(n: int) -> int:
        ran.append(n)
        return 2 * n

    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        messages = [double.send(n) for n in range(13)]
        values = [m.get_result(block=True, timeout=10_000) for m in messages]
    finally:
        worker.stop()
    assert values == [2 * n for n in range(13)]
    assert sorted(ran) == list(range(13))


def test_age_limit_counts_from_the_first_send(broker: StubBroker) -> None:
    """max_age keeps its meaning: a message that waited for its turn longer than its max_age
    is dropped by AgeLimit, as it would be without throttling, not given a fresh clock."""
    assert any(isinstance(m, AgeLimit) for m in broker.middleware)
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))
    ran: list[int] = []

    @dramatiq.actor(max_age=300, throttle={"rps": 2, "key": "age"})
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        for n in range(4):  # two run at once; the others' turns lie 0.5 s and 1 s away
            job.send(n)
        wait_for(lambda: len(broker.dead_letters) >= 2, 10, "2 messages past their max_age")
    finally:
        worker.stop()
    assert sorted(ran) == [0, 1]
    assert sorted(m.args[0] for m in broker.dead_letters) == [2, 3]


class FailingStore(MemoryStore):
    """A store that fails while ``down`` is set, like Redis while it restarts."""

    down = True
    failures = 0

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            self.failures += 1
            raise StoreError("redis is down (simulated)")
        return super().acquire(*args, **kwargs)


def test_a_store_failure_is_not_an_accidental_fail_open(broker: StubBroker) -> None:
    """While the store fails, messages are deferred through the broker, not run, and spend
    no retry (max_retries=0 would dead-letter them); they run once it is back."""
    store = FailingStore()
    broker.add_middleware(ThrottleMiddleware(Limiter(store), store_retry=0.3))
    ran: list[int] = []

    @dramatiq.actor(max_retries=0, throttle={"rps": 100, "key": "down"})
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        job.send(1)
        wait_for(lambda: store.failures >= 1, 10, "the store to be asked", every=0.01)
        assert ran == []  # the gate failed before the body: the message was deferred
        store.down = False
        wait_for(lambda: bool(ran), 10, "the message to run")
    finally:
        worker.stop()
    assert ran == [1]
    assert broker.dead_letters == []


def test_decorator_form_and_current_lease(broker: StubBroker) -> None:
    """@throttled works on actors too, and the body adjusts its lease."""
    limiter = Limiter(MemoryStore(clock=ManualClock()))
    broker.add_middleware(ThrottleMiddleware(limiter))
    seen: list[dict[str, float]] = []

    @dramatiq.actor
    @throttled(tpm=1000, key="tenant:{tenant}", consume={"tpm": 10})
    def call(tenant: str) -> None:
        lease = current_lease()
        assert lease is not None
        lease.adjust(tpm=5)
        seen.append(lease.consumed)

    worker = start(broker)
    try:
        call.send("acme")
        broker.join(call.queue_name)
        worker.join()
    finally:
        worker.stop()
    assert seen == [{"tpm": 15.0}]
    assert limiter.available("tenant:acme", [Limit.per_minute("tpm", 1000)]) == {"tpm": 985.0}


def test_unknown_options_are_still_refused(broker: StubBroker) -> None:
    """The middleware declares `throttle`; Dramatiq still refuses options nobody declared."""
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))

    @dramatiq.actor(throttle={"rps": 1})
    def fine() -> None:
        return None

    with pytest.raises(ValueError, match="throttel"):

        @dramatiq.actor(throttel={"rps": 1})
        def typo() -> None:
            return None


def test_a_failed_parking_goes_to_the_broker(broker: StubBroker) -> None:
    """Parking fails once (its Redis down): the copy goes to the broker with its delay
    instead; nothing is lost and no retry is spent (max_retries=0 would dead-letter it)."""
    middleware = ThrottleMiddleware(Limiter(MemoryStore()))
    broker.add_middleware(middleware)
    deferrals = middleware.state.deferrals()
    real_park = deferrals.park
    refused: list[str] = []

    def park_once(task_id: str, due_in: float, payload: bytes) -> None:
        if not refused:
            refused.append(task_id)
            raise StoreError("redis is down (simulated)")
        real_park(task_id, due_in, payload)

    deferrals.park = park_once  # type: ignore[method-assign]
    ran: list[int] = []

    @dramatiq.actor(max_retries=0, throttle={"rps": 1, "key": "f"})
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        for n in range(2):
            job.send(n)
        wait_for(lambda: len(ran) >= 2, 10, "2 runs")
    finally:
        worker.stop()
    assert refused, "a deferral was refused"
    assert sorted(ran) == [0, 1]
    assert broker.dead_letters == []


def test_a_bad_throttle_option_fails_at_declaration(broker: StubBroker) -> None:
    """A throttle option that throttled() refuses is an error when the actor is declared."""
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))
    with pytest.raises(InvalidInput, match="'3 parsecs'"):

        @dramatiq.actor(throttle={"rps": 1, "burst": "3 parsecs"})
        def job() -> None:
            return None

    with pytest.raises(InvalidInput, match=r"names tenant, which .*other\(\) does not take"):

        @dramatiq.actor(throttle={"rps": 1, "key": "t:{tenant}"})
        def other(user: str) -> None:
            return None


def test_the_throttle_option_takes_a_burst(broker: StubBroker) -> None:
    """throttle={"rpm": 180, "burst": "10s"}: the bucket holds ten seconds of the rate."""
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))

    @dramatiq.actor(throttle={"rpm": 180, "tpm": 6000, "burst": "10s"})
    def call() -> None:
        return None

    (spec,) = _throttles_of(call)
    assert {lim.name: round(lim.capacity) for lim in spec.limits} == {"rpm": 30, "tpm": 1000}


def test_pipelines_survive_the_deferral(broker: StubBroker) -> None:
    """A pipeline of throttled actors, deferred on the way, passes each result along."""
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))

    @dramatiq.actor(store_results=True, throttle={"rps": 10, "key": "pipe"})
    def add_one(n: int) -> int:
        return n + 1

    worker = start(broker)
    try:
        later = [
            add_one.message_with_options(args=()) for _ in range(14)
        ]  # each gets the one before
        flow = dramatiq.pipeline([add_one.message(0), *later])
        flow.run()
        assert flow.get_result(block=True, timeout=20_000) == 15
    finally:
        worker.stop()


def test_failures_release_slots_and_refund(broker: StubBroker) -> None:
    """A failing message frees its concurrency slot; with on_failure="refund" its tokens
    come back, so only the successes stay spent."""
    limiter = Limiter(MemoryStore())  # the real clock: parked messages must come due
    broker.add_middleware(ThrottleMiddleware(limiter, on_failure="refund"))
    ran: list[int] = []

    @dramatiq.actor(max_retries=0, throttle={"concurrency": 1, "tpd": 1000, "key": "g"})
    def job(n: int) -> None:
        ran.append(n)
        if n == 0:
            raise ValueError("fails on purpose")

    worker = start(broker)
    try:
        for n in range(3):
            job.send(n)
        wait_for(lambda: len(ran) >= 3, 15, "3 runs")
        broker.join(job.queue_name, fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    assert sorted(ran) == [0, 1, 2]
    left = limiter.available("g", [Limit.concurrency("concurrency", 1), Limit.per_day("tpd", 1000)])
    assert left["concurrency"] == 1.0
    assert 998.0 <= left["tpd"] < 998.1  # two successes spent (a day's refill is slow)


def test_each_retry_is_a_new_attempt_that_pays(broker: StubBroker) -> None:
    """Retries re-sends a failed message with the same id and options; each attempt takes a
    lease of its own instead of replaying the first attempt's grant for free."""
    clock = ManualClock()
    limiter = Limiter(MemoryStore(clock=clock))
    broker.add_middleware(ThrottleMiddleware(limiter))
    leases: list[str] = []

    @dramatiq.actor(min_backoff=10, max_backoff=20, throttle={"rph": 10, "key": "retry"})
    def flaky() -> None:
        lease = current_lease()
        assert lease is not None
        leases.append(lease.id)
        if len(leases) < 3:
            raise RuntimeError("the callee answered 429")

    worker = start(broker)
    try:
        flaky.send()
        wait_for(lambda: len(leases) >= 3, 10, "three attempts")
    finally:
        worker.stop()
    assert len(set(leases)) == 3, leases
    assert limiter.available("retry", [Limit.per_hour("rph", 10)]) == {"rph": 7.0}


class Deliveries(dramatiq.Middleware):
    """Counts the deliveries of each message."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def before_process_message(self, broker: Any, message: Any) -> None:
        self.counts[message.message_id] = self.counts.get(message.message_id, 0) + 1


def test_a_parked_message_waits_for_its_turn(broker: StubBroker) -> None:
    """A message parked without a reservation (its turn lies past the horizon) comes back
    after its retry-after, not spun through the queue meanwhile."""
    deliveries = Deliveries()
    broker.add_middleware(deliveries)
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore()), horizon=0))
    ran: list[int] = []

    @dramatiq.actor(throttle={"rps": 2, "key": "parked"}, max_retries=0)
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        for n in range(8):  # two now, the others over three seconds, competing each time
            job.send(n)
        wait_for(lambda: len(ran) >= 8, 10, "8 runs")
    finally:
        worker.stop()
    assert sorted(ran) == list(range(8))
    assert sorted(deliveries.counts.values())[:2] == [1, 1]
    assert max(deliveries.counts.values()) <= 10, deliveries.counts  # not every 50 ms


def test_a_forged_reservation_option_is_charged(broker: StubBroker) -> None:
    """A message sent with a made-up reservation in its taskthrottle option is charged like
    a first delivery: of three on a limit of one an hour, one runs."""
    limiter = Limiter(MemoryStore())
    broker.add_middleware(ThrottleMiddleware(limiter))
    ran: list[int] = []

    @dramatiq.actor(throttle={"rph": 1, "key": "forged"})
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        for n in range(3):
            forged = {"lease": f"forged-{n}", "due": time.time(), "token": f"t{n}"}
            job.send_with_options(args=(n,), taskthrottle=forged)
        broker.join(job.queue_name)
        worker.join()
    finally:
        worker.stop()
    assert len(ran) == 1
    assert limiter.available("forged", [Limit.per_hour("rph", 1)])["rph"] < 0.01


class Planted:
    """Unpickling it runs code (here it only records that it ran)."""

    ran: ClassVar[list[str]] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (Planted.ran.append, ("pwned",))


def test_parked_messages_are_json_whatever_the_encoder(broker: StubBroker) -> None:
    """Even with Dramatiq's PickleEncoder, the releaser reads parked messages as JSON only:
    a pickle planted in the parking Redis is set aside, never unpickled, and the good
    message claimed with it is enqueued."""
    import pickle

    from dramatiq.encoder import JSONEncoder, PickleEncoder

    from taskthrottle.dramatiq import encode_parked, release_due

    middleware = ThrottleMiddleware(Limiter(MemoryStore()))
    broker.add_middleware(middleware)

    @dramatiq.actor(throttle={"rps": 1, "key": "json"})
    def job(n: int) -> None:
        return None

    dramatiq.set_encoder(PickleEncoder())
    try:
        deferrals = middleware.state.deferrals()
        deferrals.park("planted", 0, pickle.dumps(Planted()))
        deferrals.park("good", 0, encode_parked(job.message(1)))
        assert release_due(middleware, broker) == 1
    finally:
        dramatiq.set_encoder(JSONEncoder())
    assert Planted.ran == []
    assert set(deferrals.set_aside) == {"planted"}  # type: ignore[attr-defined]
    assert broker.queues[job.queue_name].qsize() == 1


def test_a_deferral_logs_one_info_line_without_arguments(
    broker: StubBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Each deferral says, at INFO on taskthrottle.dramatiq, which actor and message waits,
    how long and for which key and limit, never the message's arguments; Dramatiq's own
    "was skipped" WARNING, which prints them all, is not logged for it."""
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))
    ran: list[str] = []

    @dramatiq.actor(throttle={"rps": 1, "key": "logs"})
    def summarize(prompt: str) -> None:
        ran.append(prompt)

    worker = start(broker)
    try:
        with caplog.at_level("INFO"):
            summarize.send("secret prompt one")
            summarize.send("secret prompt two")
            wait_for(lambda: len(ran) >= 2, 10, "both messages")
    finally:
        worker.stop()
    deferrals = [r for r in caplog.records if r.name == "taskthrottle.dramatiq"]
    assert len(deferrals) == 1 and deferrals[0].levelname == "INFO"
    line = deferrals[0].getMessage()
    assert line.startswith("taskthrottle: summarize[") and "logs/rps" in line
    assert not any("secret prompt" in r.getMessage() for r in caplog.records)
    assert not any("was skipped" in r.getMessage() for r in caplog.records)


def test_a_message_id_sent_again_is_not_run_for_free(broker: StubBroker) -> None:
    """Three messages under one message id (a producer reusing an id): one runs, charged
    once; the others are dropped, not given the first one's grant for free."""
    limiter = Limiter(MemoryStore())
    deliveries = Deliveries()
    broker.add_middleware(deliveries)
    broker.add_middleware(ThrottleMiddleware(limiter))
    ran: list[int] = []

    @dramatiq.actor(throttle={"rph": 10, "key": "reused"})
    def job(n: int) -> None:
        ran.append(n)

    worker = start(broker)
    try:
        for n in range(3):
            broker.enqueue(job.message(n).copy(message_id="same"))
        wait_for(lambda: deliveries.counts.get("same", 0) >= 3, 10, "three deliveries")
        broker.join(job.queue_name)
        worker.join()
    finally:
        worker.stop()
    assert ran == [0]
    assert 9 <= limiter.available("reused", [Limit.per_hour("rph", 10)])["rph"] < 9.5


def test_a_dropped_duplicate_stores_no_result_over_the_real_one(broker: StubBroker) -> None:
    """A second delivery of a message that ran is dropped without storing None (the
    Results middleware's skip) over the value the first delivery stored."""
    deliveries = Deliveries()
    broker.add_middleware(deliveries)
    broker.add_middleware(ThrottleMiddleware(Limiter(MemoryStore())))

    @dramatiq.actor(store_results=True, throttle={"rph": 10, "key": "dup"})
    def double(n: int) -> int:
        return 2 * n

    worker = start(broker)
    try:
        first = broker.enqueue(double.message(21).copy(message_id="dup-1"))
        assert first.get_result(block=True, timeout=10_000) == 42
        broker.enqueue(double.message(21).copy(message_id="dup-1"))
        wait_for(lambda: deliveries.counts.get("dup-1", 0) >= 2, 10, "the second delivery")
        broker.join(double.queue_name)
        worker.join()
    finally:
        worker.stop()
    assert first.get_result(block=False) == 42


def test_the_redis_broker_charges_a_reused_message_id_apart() -> None:
    """On the Redis broker each enqueue has an id of its own, kept on redelivery: a second
    message under a reused message id has a lease of its own (and pays), while a redelivery
    of the same enqueue replays its grant."""
    from taskthrottle.dramatiq import _delivery

    def message(**options: str) -> Any:
        return dramatiq.Message("q", "a", (), {}, options, "m", 0)

    assert _delivery(message(redis_message_id="r1")) == ("m.r1", False)
    assert _delivery(message(redis_message_id="r2")) == ("m.r2", False)
    assert _delivery(message()) == ("m", True)  # a broker that says nothing: once


def held_after_a_refusal(
    broker: StubBroker, *, stray_runs: bool
) -> tuple[ThrottleMiddleware, Any, list[str | None], list[int]]:
    """An actor whose body a breaker refuses, and whose hand-back then fails: the enqueue
    raised, but (``stray_runs``) its copy got out and started all the same. Returns the
    middleware, the actor, the maker each hand-back named, and the body's runs."""
    from dramatiq.middleware import SkipMessage

    from taskthrottle import Breaker, BreakerOpen

    middleware = ThrottleMiddleware(Limiter(MemoryStore()), jitter=0.0)
    broker.add_middleware(middleware)
    name = f"held-{uuid.uuid4().hex[:8]}"
    Breaker(name, Limiter(MemoryStore()))
    priors: list[str | None] = []
    runs: list[int] = []

    def lost_reply(broker: Any, message: Any, turn: Any, prior: str | None) -> None:
        priors.append(prior)
        if len(priors) > 1:
            raise SkipMessage("handed back this time")
        if stray_runs:  # the copy reached the broker, and a worker started it
            assert middleware.state.deferrals().begin(message.message_id, "stray", prior)

    middleware._defer = lost_reply  # type: ignore[method-assign]

    @dramatiq.actor(max_retries=0, throttle={"rph": 10, "key": "held", "breaker": name})
    def job() -> None:
        runs.append(1)
        raise BreakerOpen(name, 0.001, "open")

    return middleware, job, priors, runs


def run_delivery(broker: StubBroker, middleware: ThrottleMiddleware, actor: Any) -> None:
    """Process one message of ``actor`` as a worker thread does, up to the skip."""
    from dramatiq.middleware import SkipMessage

    message = actor.message()
    middleware.before_process_message(broker, message)
    with pytest.raises(SkipMessage):
        actor.fn()
    middleware.after_skip_message(broker, message)


def test_a_body_refusal_whose_copy_ran_is_dropped(broker: StubBroker) -> None:
    """A breaker refuses the body, the enqueue raises, but its copy ran: the message is
    dropped, not run again beside it, and its grant is given back."""
    middleware, job, priors, runs = held_after_a_refusal(broker, stray_runs=True)
    run_delivery(broker, middleware, job)
    assert (priors, len(runs)) == ([None], 1)
    rph = Limit.per_hour("rph", 10)
    assert middleware.state.limiter().available("held", [rph]) == {"rph": 10.0}


def test_a_body_refusal_held_here_takes_the_message_over(broker: StubBroker) -> None:
    """The copy did not get out: the message takes itself over and runs its body again;
    its next hand-back names the take-over's mark as its maker."""
    middleware, job, priors, runs = held_after_a_refusal(broker, stray_runs=False)
    run_delivery(broker, middleware, job)
    assert (priors, len(runs)) == ([None, "body:"], 2)
