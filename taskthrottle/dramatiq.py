"""Dramatiq: a middleware that defers throttled messages to their turn.

    broker.add_middleware(ThrottleMiddleware(Limiter(RedisStore.from_url(...))))

    @dramatiq.actor(throttle={"rpm": 500, "tpm": 90_000, "key": "tenant:{tenant_id}"})
    def summarize(tenant_id, prompt): ...

Before a message is processed the middleware books its turn. A message whose turn is
later is enqueued again with the delay to its turn (or parked in the store when the turn
is far away) and the current delivery is skipped and acknowledged: it is never failed and
never counted against ``max_retries``. The copy carries its reservation in the
``taskthrottle`` message option and runs without acquiring again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

from taskthrottle._deferrals import OWNED, Parked, RedisDeferrals, Releaser, Unreadable
from taskthrottle._exceptions import BreakerOpen, InvalidInput, StoreError, require
from taskthrottle._gate import Defer, book_turn, give_back, refused, settle, take_over
from taskthrottle._lease import Lease
from taskthrottle._limiter import Limiter
from taskthrottle._settings import Settings, State
from taskthrottle._throttle import (
    Request,
    Throttle,
    check_key_fields,
    enter_lease,
    leave_lease,
    plan,
    throttle_spec,
    throttles_of,
)

require("dramatiq", "dramatiq")

import dramatiq  # noqa: E402  (after the check that names the missing extra)
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage  # noqa: E402

log = logging.getLogger("taskthrottle.dramatiq")

#: The message option a deferred copy carries: {"gen", "lease", "token"}.
OPTION = "taskthrottle"


#: Dramatiq moves delayed messages to their queue only once per worker timeout (1 s by
#: default), which bunches their starts. So every deferral is parked, and each worker
#: process releases due messages straight to the queue every 50 ms.
DRAMATIQ_DEFAULTS: dict[str, Any] = {"park_after": 0.0, "park_lead": 0.0, "park_poll": 0.05}


class _QuietSkips(logging.Filter):
    """Drops Dramatiq's own "Message ... was skipped." WARNING for the skips the middleware
    makes, which log one INFO line of their own without the message's arguments; other
    middleware's skips keep their warning. Per thread, as Dramatiq logs it in the thread
    that skipped."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def skip(self, message_id: str | None) -> None:
        """The message this thread is about to skip (None: done with it)."""
        self._local.message_id = message_id

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the skip warning of the message this thread skipped."""
        skipping = getattr(self._local, "message_id", None)
        if skipping is None or record.msg != "Message %s was skipped.":
            return True
        found = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return bool(getattr(found, "message_id", None) != skipping)


class BadThrottle(MiddlewareError, InvalidInput):
    """Raised when an actor is declared with a throttle that ``throttled()`` refuses."""


class DeferFailed(MiddlewareError):
    """Raised when the middleware could not decide on a message or hand it back: the message
    then takes Dramatiq's failure path (Retries) instead of being acknowledged and lost, or
    run unthrottled."""


class ThrottleMiddleware(Middleware):
    """Enforces ``throttle=...`` actor options and ``@throttled`` specs fleet-wide.

    ``limiter`` is a `Limiter`, a factory called once per worker process, or None for a
    `MemoryStore` (one process). ``settings`` are the fields of `taskthrottle.celery.Settings`
    that apply here: horizon, jitter, park_after, park_lead, park_poll, on_failure,
    on_store_error, store_retry.
    """

    def __init__(self, limiter: Limiter | Callable[[], Limiter] | None = None, **settings: Any):
        self.state = State(Settings(**(DRAMATIQ_DEFAULTS | settings)), limiter)
        # The lease of the message this thread processes, with its context token: a stale
        # copy skipped in another thread must not settle it.
        self._held = threading.local()
        self._skipping = _QuietSkips()
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(self._skipping)
        self._specs: dict[str, tuple[Throttle, ...]] = {}
        self._stopping = threading.Event()
        self._releaser: threading.Thread | None = None

    @property
    def actor_options(self) -> set[str]:
        """Dramatiq accepts ``throttle=`` on actors because of this."""
        return {"throttle"}

    def before_declare_actor(self, broker: Any, actor: Any) -> None:
        """Check an actor's throttles when it is declared, not when its first message runs
        (only a MiddlewareError raised here reaches the caller)."""
        try:
            self._specs[actor.actor_name] = _throttles_of(actor)
        except (TypeError, ValueError) as exc:
            raise BadThrottle(f"actor {actor.actor_name!r} has a bad throttle: {exc}") from exc
        self._guard(actor)

    def _guard(self, actor: Any) -> None:
        """Have a throttled actor's body hand its message back when a breaker refuses one of
        its calls (`BreakerOpen`), instead of failing: the one place that can tell, since
        Dramatiq's Retries would count any exception the actor raised."""
        fn = actor.fn
        if not self._specs.get(actor.actor_name) or getattr(fn, "_taskthrottle_guarded", False):
            return

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            while True:
                try:
                    return fn(*args, **kwargs)
                except BreakerOpen as exc:
                    self._refused_in_body(exc)

        body._taskthrottle_guarded = True  # type: ignore[attr-defined]
        actor.fn = body

    def before_process_message(self, broker: Any, message: Any) -> None:
        """Book the message's turn; run it now under its lease, or defer it and skip."""
        actor = broker.get_actor(message.actor_name)
        throttles = self._specs.get(actor.actor_name)
        if throttles is None:
            throttles = self._specs[actor.actor_name] = _throttles_of(actor)
            self._guard(actor)
        if not throttles:
            return
        try:
            ask = plan(throttles, actor.fn, tuple(message.args), message.kwargs, actor.actor_name)
            lease = self._admit(broker, message, ask)
        except MiddlewareError:
            raise
        except Exception as exc:
            # Dramatiq would log any other exception and run the actor anyway, unthrottled.
            raise DeferFailed(f"could not throttle message {message.message_id}: {exc}") from exc
        if lease is not None:
            self._held.lease = (message.message_id, lease, enter_lease(lease))

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Settle the lease: free its slots, refund on failure if asked."""
        self._settle(message, failed=exception is not None)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        """A message skipped after its lease was granted (by a later middleware) settles too."""
        self._skipping.skip(None)
        self._settle(message, failed=True)

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        """Start releasing parked messages from this worker process."""
        self._releaser = threading.Thread(
            target=self._release_loop, args=(broker,), name="taskthrottle-releaser", daemon=True
        )
        self._releaser.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        """Stop releasing; parked messages wait for another worker."""
        self._stopping.set()
        if self._releaser is not None:
            self._releaser.join(timeout=10)

    def _admit(self, broker: Any, message: Any, ask: Request) -> Lease | None:
        self._bind(broker)
        found = message.options.get(OPTION)
        meta = turn_meta = dict(found) if isinstance(found, dict) else {}
        token = meta.get("token")
        begun = self._begin(message.message_id, token, meta.get("prior")) if token else 1
        if not begun:
            log.info("taskthrottle: dropping a stale copy of message %s", message.message_id)
            self._drop(message, "stale copy")
        attempt = int(message.options.get("retries") or 0)
        delivery, once = _delivery(message)
        # What the copies this delivery hands back name as their maker. Dramatiq acks after
        # the body, so the redelivery of one that took its task over (OWNED) runs again.
        maker = f"body:{token}" if begun == OWNED else token
        while True:
            turn = book_turn(self.state, ask, delivery, turn_meta, attempt, once=once)
            if turn is None:
                log.info("taskthrottle: dropping a second delivery of message %s", delivery)
                self._drop(message, "delivered again")
            if not isinstance(turn, Defer):
                if turn is not None:
                    self._held.context = (broker, message, ask, turn_meta, attempt, maker)
                return turn
            self._defer(broker, message, turn, maker)
            # The broker refused the copy: Retries would need the same broker, and a skip
            # would lose the message. It waits here, in this thread, for its turn, taken
            # over first: the failed hand-back may have got out all the same.
            maker = take_over(self.state, message.message_id, token, meta.get("prior"))
            if maker is None:
                log.info("taskthrottle: dropping message %s: a copy of it ran", delivery)
                self._drop(message, "a copy ran")
            log.warning(
                "taskthrottle: could not hand message %s back; holding it %.1f s in this worker",
                message.message_id,
                turn.wait,
            )
            time.sleep(turn.wait)
            turn_meta = turn.meta

    def _drop(self, message: Any, why: str) -> NoReturn:
        """Skip a delivery that must not run: another copy of it runs, or ran. With the
        Results middleware, a skipped message would store None under the message id, over
        the result of the copy that runs."""
        message.options["store_results"] = False
        self._skipping.skip(message.message_id)
        raise SkipMessage(f"taskthrottle: {why}")

    def _bind(self, broker: Any) -> None:
        """Park in the broker's Redis, when the broker is Redis (and no park_url is set)."""
        if self.state.parking_unset():
            app = f"dramatiq.{getattr(broker, 'namespace', None) or 'stub'}"
            self.state.park_with(lambda: _parking_client(broker, self.state.settings), app)

    def _begin(self, message_id: str, token: str, prior: str | None) -> int:
        try:
            return self.state.deferrals().begin(message_id, token, prior)
        except StoreError:
            return 1  # cannot tell: at-least-once beats losing the message

    def _defer(self, broker: Any, message: Any, turn: Defer, prior: str | None) -> None:
        """Enqueue a copy for ``turn.wait`` seconds from now (or park it), then skip this one
        (raises SkipMessage); returns only when the broker refused the copy.

        The copy keeps the message's timestamp, so that ``max_age`` counts from when it was
        first sent, as without throttling. A copy made while the store fails goes through
        the broker alone, naming the delivery that made it (``prior``).
        """
        meta = {**turn.meta, "token": uuid.uuid4().hex, "prior": prior}
        if turn.offline:
            meta["due"] = time.time() + turn.wait
        copy = message.copy(options={**message.options, OPTION: meta})
        parks = not turn.offline and turn.wait > self.state.settings.park_after
        if not (parks and self._park(copy, turn.wait)):
            try:
                broker.enqueue(copy, delay=max(1, round(turn.wait * 1000)))
            except Exception:
                return
            if not turn.offline:
                with contextlib.suppress(StoreError):
                    self.state.deferrals().expect(message.message_id, meta["token"], prior=prior)
        # With the Results middleware a skipped message would store None under the same
        # message id, and a caller waiting for the result would get it before the copy ran.
        message.options["store_results"] = False
        how = "parked" if parks else "sent back"
        log.info(
            "taskthrottle: %s[%s] %s for %.2f s: waits for %s",
            message.actor_name,
            message.message_id,
            how,
            turn.wait,
            turn.why,
        )
        self._skipping.skip(message.message_id)
        raise SkipMessage("taskthrottle: deferred to its turn")

    def _park(self, copy: Any, wait: float) -> bool:
        """Park ``copy`` for ``wait`` seconds (released with a token of its own); False if
        parking failed."""
        meta = {k: v for k, v in copy.options[OPTION].items() if k != "token"}
        parked = copy.copy(options={**copy.options, OPTION: meta})
        try:
            payload = encode_parked(parked)
        except (TypeError, ValueError):  # arguments only a pickle can carry: wait in the broker
            return False
        try:
            self.state.deferrals().park(copy.message_id, wait, payload)
        except StoreError:
            return False
        return True

    def _refused_in_body(self, exc: BreakerOpen) -> None:
        """A breaker refused a call of the running actor (it opened after the gate let the
        message in): hand the message back like a throttled one, its lease given back
        (raises SkipMessage); re-raises outside a gated message.

        When the broker refused the copy, the message waits here, then takes itself over
        (the copy may have got out all the same, see `take_over`) and returns, for the
        body to run again under the same lease; its next hand-backs name the mark that
        returned as their maker. If that copy ran first, the message is dropped."""
        held = getattr(self._held, "lease", None)
        context = getattr(self._held, "context", None)
        if held is None or context is None or context[1].message_id != held[0]:
            raise exc
        broker, message, ask, meta, attempt, maker = context
        turn = refused(self.state, ask, meta, attempt, exc)
        try:
            self._defer(broker, message, turn, maker)
            log.warning(
                "taskthrottle: could not hand message %s back; holding it %.1f s in this worker",
                message.message_id,
                turn.wait,
            )
            time.sleep(turn.wait)
            found = message.options.get(OPTION)
            own = found if isinstance(found, dict) else {}
            taken = take_over(self.state, message.message_id, own.get("token"), own.get("prior"))
            if taken is None:
                log.info("taskthrottle: dropping message %s: a copy of it ran", message.message_id)
                self._drop(message, "a copy ran")
        except SkipMessage:
            give_back(held[1])
            raise
        self._held.context = (broker, message, ask, meta, attempt, taken)

    def _settle(self, message: Any, *, failed: bool) -> None:
        self._held.context = None
        held = getattr(self._held, "lease", None)
        if held is None or held[0] != message.message_id:
            return
        del self._held.lease
        _, lease, token = held
        leave_lease(token)
        settle(lease, self.state.settings, failed=failed)

    def _release_loop(self, broker: Any) -> None:
        self._bind(broker)
        state = self.state
        deferrals = state.deferrals()
        if isinstance(deferrals, RedisDeferrals):
            deferrals.warn_if_volatile()
        releaser = Releaser(deferrals, state.settings.park_lead)
        while not self._stopping.wait(state.settings.park_poll):
            try:
                release_due(self, broker, releaser)
            except Exception:  # a bug: say so, and keep releasing
                log.exception("taskthrottle: releasing parked messages failed; will try again")


def release_due(
    middleware: ThrottleMiddleware, broker: Any, releaser: Releaser | None = None
) -> int:
    """Enqueue every parked message due within the lead; returns how many."""

    def publish(item: Parked, token: str) -> None:
        parked = decode_parked(item.payload)
        options = {**parked.options, OPTION: {**parked.options.get(OPTION, {}), "token": token}}
        delay = round(item.due_in * 1000)
        broker.enqueue(parked.copy(options=options), delay=delay if delay > 0 else None)

    if releaser is None:
        state = middleware.state
        releaser = Releaser(state.deferrals(), state.settings.park_lead)
    return releaser.release(publish)


_FIELDS = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
    "message_timestamp": int,
}


def encode_parked(message: Any) -> bytes:
    """A parked message as JSON, whatever the broker's encoder: the releaser never unpickles
    what it finds in Redis. ``TypeError`` for arguments JSON cannot carry."""
    return json.dumps(message.asdict(), separators=(",", ":")).encode()


def decode_parked(payload: bytes) -> Any:
    """A message back from `encode_parked`; `Unreadable` unless it has exactly the fields
    of a message, of the right types."""
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise Unreadable(f"not JSON: {exc}") from exc
    if not (isinstance(data, dict) and data.keys() == _FIELDS.keys()):
        raise Unreadable("not a parked message")
    for name, kind in _FIELDS.items():
        if not isinstance(data[name], kind):
            raise Unreadable(f"{name} is not a {kind.__name__}")
    return dramatiq.Message(**data)


def _delivery(message: Any) -> tuple[str, bool]:
    """What a message's lease ids are made of, and whether a second grant of them means a
    duplicate to drop (``once``).

    Dramatiq acknowledges a message after its actor ran, so a redelivery (its worker died)
    runs again, replaying its grant. The Redis broker gives each enqueue an id of its own,
    kept when it requeues a dead worker's messages: with it in the lease id, a second message
    sent under the same message id (a producer reusing one) pays for itself. RabbitMQ marks
    redeliveries, so an unmarked delivery of a granted id is a duplicate and is dropped; so
    is any on a broker that says neither."""
    enqueued = message.options.get("redis_message_id")
    if isinstance(enqueued, str):
        return f"{message.message_id}.{enqueued}", False
    return message.message_id, not getattr(message, "redelivered", False)


def _parking_client(broker: Any, settings: Settings) -> Any:
    """The Redis client parked messages live in: ``park_url``, else the broker's when it is
    a RedisBroker (None: park beside the limiter's state)."""
    if settings.park_url is not None:
        from taskthrottle._redis import client_for

        return client_for(settings.park_url)
    client = getattr(broker, "client", None)
    return client if type(client).__module__.startswith("redis") else None


def _throttles_of(actor: Any) -> tuple[Throttle, ...]:
    """An actor's ``throttle=`` option (a dict of `throttled` keyword arguments, and
    ``"limits"``: a list of `Limit` objects) and its ``@throttled`` specs, as one stack."""
    found = throttles_of(actor.fn)
    option = dict(actor.options.get("throttle") or {})
    if option:
        limits = option.pop("limits", ())  # Limit objects, for what keywords cannot say
        key, consume = option.pop("key", None), option.pop("consume", None)
        breaker = option.pop("breaker", None)
        strategy = option.pop("strategy", "token_bucket")
        burst = option.pop("burst", None)
        spec = throttle_spec(tuple(limits), key, consume, option, breaker, strategy, burst)
        check_key_fields(spec, actor.fn)
        found = (*found, spec)
    return found
