"""The gate every throttled task passes in the worker, right before its body.

It runs in the task's ``__call__``, inside Celery's tracer, where ``Ignore`` and
``Reject`` are honoured (signal handlers cannot stop a task). A task that must wait
books a reservation and hands a copy of itself (same id, arguments, headers, links,
chain, retries) back to the broker for its turn, or parks it in the store when the turn
is far away; the current delivery is then acknowledged without running. The copy
finds its reservation in a header and runs without acquiring again.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, NoReturn

from celery import Task, states
from celery.app.autoretry import add_autoretry_behaviour
from celery.exceptions import Ignore, Reject
from kombu.serialization import dumps, loads, prepare_accept_content

from taskthrottle._deferrals import OWNED, Unreadable
from taskthrottle._exceptions import BreakerOpen, InvalidInput, StoreError, Throttled
from taskthrottle._gate import Defer, book_turn, give_back, refused, settle, take_over
from taskthrottle._lease import Lease
from taskthrottle._settings import State
from taskthrottle._throttle import Request, lease_scope, plan, throttles_of

log = logging.getLogger("taskthrottle.celery")

#: The header a deferred copy carries: {"gen": deferrals so far, "lease": its booked
#: reservation, "token": which copy this is}.
HEADER = "taskthrottle"


def state_of(app: Any) -> State:
    """The integration ``install`` left on ``app``."""
    state: State | None = getattr(app, "taskthrottle", None)
    if state is None:
        raise InvalidInput(f"taskthrottle.celery.install() was not called for app {app.main!r}")
    return state


def gated_call(task: Task, *args: Any, **kwargs: Any) -> Any:
    """A task's ``__call__``: pass the gate, run the body under the lease, settle it."""
    if task.request.called_directly:  # a plain function call, not an execution
        return Task.__call__(task, *args, **kwargs)
    state = state_of(task.app)
    throttles = throttles_of(task) or state.default
    if not throttles:
        return _body(task, args, kwargs)
    ask = plan(throttles, task.run, args, kwargs, default_key=task.name)
    if task.request.is_eager:
        lease, maker = _eager(state, ask), None
    else:
        lease, maker = _admit(task, state, ask)
    if lease is None:
        return _body(task, args, kwargs)
    with lease_scope(lease):
        while True:
            try:
                result = _body(task, args, kwargs)
            except BreakerOpen as exc:
                if task.request.is_eager:
                    settle(lease, state.settings, failed=True)
                    raise
                maker = _refused_in_body(task, state, ask, lease, exc, maker)
                continue  # held here, as it could not be handed back: run it again
            except BaseException:
                settle(lease, state.settings, failed=True)
                raise
            break
    settle(lease, state.settings, failed=False)
    return result


def _refused_in_body(
    task: Task, state: State, ask: Request, lease: Lease, exc: BreakerOpen, maker: str | None
) -> str:
    """A breaker refused a call of the body (it opened after the gate let the task in):
    the task is handed back like a throttled one, its lease given back, never failed nor
    counted as a retry (raises Ignore). Its copy names ``maker``, the mark of this
    delivery.

    When it could not be handed back, the task waits here, then takes itself over (a
    copy whose publish or park failed may have got out all the same, see `take_over`):
    returns the mark the next hand-backs name as their maker, for the body to run again
    under the same lease; if that copy ran first, this delivery is dropped (Ignore)."""
    request = task.request
    meta = meta_of(request)
    turn = refused(state, ask, meta, request.retries or 0, exc)
    try:
        _defer(task, state, turn, maker)
        log.warning(
            "taskthrottle: could not hand %s[%s] back; holding it %.1f s in this worker",
            task.name,
            request.id,
            turn.wait,
        )
        time.sleep(turn.wait)
        taken = take_over(state, request.id, meta.get("token"), meta.get("prior"))
        if taken is None:
            log.info("taskthrottle: dropping %s[%s]: a copy of it ran", task.name, request.id)
            raise Ignore()
    except (Ignore, Reject):
        give_back(lease)
        settle(lease, state.settings, failed=False)  # its probe permits, if any
        raise
    return taken


def _body(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Celery's own __call__ would push a second, id-less request: the tracer already pushed
    # the real one. A __call__ of the user's own base class is called, though.
    following = getattr(type(task), "_taskthrottle_next_call", Task.__call__)
    if following is Task.__call__:
        return task.run(*args, **kwargs)
    return following(task, *args, **kwargs)


def meta_of(request: Any) -> dict[str, Any]:
    """The taskthrottle header of a delivery ({} for a task never deferred)."""
    found = request.get(HEADER) or (request.headers or {}).get(HEADER)
    return found if isinstance(found, dict) else {}


def _admit(task: Task, state: State, ask: Request) -> tuple[Lease, str | None]:
    """The lease to run under now, and the mark of this delivery that its copies name as
    their maker; otherwise the task is handed back (Ignore or Reject)."""
    request = task.request
    meta = meta_of(request)
    begun = _current_copy(task, state, meta)
    if not begun:
        log.info("taskthrottle: dropping a stale copy of %s[%s]", task.name, request.id)
        raise Ignore()
    # Acknowledged before it ran (the default), a task delivered again was granted, and
    # started, under an ack that got lost: it must not run twice. Under acks_late a
    # redelivery is the broker handing back a task whose worker died: it runs again.
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    once = not (task.acks_late and redelivered)
    token = meta.get("token")
    if begun == OWNED and once:  # it ran where it was held, and this is its lost ack
        log.info("taskthrottle: dropping a second delivery of %s[%s]", task.name, request.id)
        raise Ignore()
    # maker: what this delivery's copies name as the delivery that made them
    turn_meta, maker = meta, (f"body:{token or ''}" if begun == OWNED else token)
    while True:
        turn = book_turn(state, ask, request.id, turn_meta, request.retries or 0, once=once)
        if turn is None:
            log.info("taskthrottle: dropping a second delivery of %s[%s]", task.name, request.id)
            raise Ignore()
        if not isinstance(turn, Defer):
            return turn, maker
        _defer(task, state, turn, maker)
        # Neither the broker nor the store took the task back: it waits here, in this
        # worker, for its turn. The failed hand-back may have got out all the same, and
        # an ack lost meanwhile brings this delivery back: both must find it taken over.
        maker = take_over(state, request.id, token, meta.get("prior"))
        if maker is None:
            log.info("taskthrottle: dropping %s[%s]: a copy of it ran", task.name, request.id)
            raise Ignore()
        log.warning(
            "taskthrottle: could not hand %s[%s] back; holding it %.1f s in this worker",
            task.name,
            request.id,
            turn.wait,
        )
        time.sleep(turn.wait)
        turn_meta = turn.meta


def _current_copy(task: Task, state: State, meta: dict[str, Any]) -> int:
    """0 for a delivery that another copy of the task has superseded (the original
    redelivered after it was deferred, or a copy published twice); `OWNED` for the
    redelivery of one that took its task over (see `Deferrals.begin`); else 1."""
    token = meta.get("token")
    if token is None and not (task.request.delivery_info or {}).get("redelivered"):
        return True  # a first delivery of a task never deferred: nothing to check
    try:
        return state.deferrals().begin(task.request.id, token, meta.get("prior"))
    except StoreError:
        return True  # cannot tell: at-least-once beats losing the task


def _defer(task: Task, state: State, turn: Defer, prior: str | None) -> None:
    """Hand the task back for ``turn.wait`` seconds from now, then skip this delivery
    (raises Ignore); returns only when the task could not be handed back.

    A far turn is parked (in the broker's Redis, or beside the store), a near one goes to
    the broker with a countdown, and so does a far one when parking fails. A copy made
    while the store fails goes through the broker alone, naming the delivery that made it
    (``prior``), by which the store recognises it later. Under ``acks_late`` a task that
    cannot be published at all is requeued by the broker, once whatever the failed publish
    may have sent all the same is made stale.
    """
    request = task.request
    meta = {**turn.meta, "token": uuid.uuid4().hex, "prior": prior}
    if turn.offline:
        meta["due"] = time.time() + turn.wait
    headers = {**(request.headers or {}), HEADER: meta}
    if (
        not turn.offline
        and turn.wait > state.settings.park_after
        and _park(task, state, headers, turn.wait)
    ):
        _handed_back(task, turn, "parked")
    try:
        copy = task.signature_from_request(
            request, countdown=max(turn.wait, 0.001), headers=headers
        )
        copy.apply_async()
    except Exception as exc:
        if task.acks_late and _disown_copies(task, state):
            raise Reject(exc, requeue=True) from exc
        return
    if not turn.offline:
        # Only a published copy may make the original stale: had the publish failed, the
        # requeued original would have been dropped as stale, and the task lost.
        with contextlib.suppress(StoreError):
            state.deferrals().expect(request.id, meta["token"], prior=prior)
    _handed_back(task, turn, "sent back")


def _disown_copies(task: Task, state: State) -> bool:
    """Make stale what a failed hand-back may have parked or published all the same, so
    that the requeued delivery runs alone. False if the store cannot, or such a copy
    started already: the task then stays in this worker (held, or dropped)."""
    meta = meta_of(task.request)
    try:
        return state.deferrals().own(task.request.id, meta.get("token"), meta.get("prior"))
    except StoreError:
        return False


def _handed_back(task: Task, turn: Defer, how: str) -> NoReturn:
    """Log the deferral in one INFO line (never the arguments), and skip this delivery."""
    log.info(
        "taskthrottle: %s[%s] %s for %.2f s: waits for %s",
        task.name,
        task.request.id,
        how,
        turn.wait,
        turn.why,
    )
    _hide_started(task)
    raise Ignore()


def _park(task: Task, state: State, headers: dict[str, Any], wait: float) -> bool:
    """Park the task until shortly before its turn; False if parking failed."""
    meta = {k: v for k, v in headers[HEADER].items() if k != "token"}  # released with a new one
    copy = task.signature_from_request(task.request, headers={**headers, HEADER: meta})
    try:
        state.deferrals().park(task.request.id, wait, encode(task.app, dict(copy)))
    except StoreError:
        return False
    return True


def _hide_started(task: Task) -> None:
    """With ``task_track_started`` Celery stored STARTED before the gate ran: a task that
    waits for its turn is PENDING again, as it was before this delivery."""
    if task.track_started or task.app.conf.task_track_started:
        with contextlib.suppress(Exception):  # a result backend that fails: nothing worse
            task.backend.store_result(task.request.id, None, states.PENDING, request=task.request)


def encode(app: Any, message: dict[str, Any]) -> bytes:
    """A parked task as bytes, in the app's task serializer."""
    content_type, encoding, body = dumps(message, serializer=app.conf.task_serializer)
    data = body if isinstance(body, bytes) else body.encode(encoding)
    return f"{content_type}\n{encoding}\n".encode() + data


def decode(app: Any, payload: bytes) -> dict[str, Any]:
    """A parked task back from `encode`, in a content type the app accepts (its
    ``accept_content``, as for a message from its broker); `Unreadable` otherwise."""
    try:
        content_type, encoding, body = payload.split(b"\n", 2)
        accept = prepare_accept_content(app.conf.accept_content)
        found = loads(body, content_type.decode(), encoding.decode(), accept=accept)
    except Exception as exc:  # kombu's ContentDisallowed, a decoding error, a bad split
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(found, dict) or not isinstance(found.get("task"), str):
        raise Unreadable(f"not a task signature: {type(found).__name__}")
    return found


def _eager(state: State, ask: Request) -> Lease | None:
    """Eager mode has no queue to come back through: wait inline for the turn, or bypass."""
    if state.settings.eager == "bypass":
        return None
    limiter = state.limiter()
    if not ask.target:  # every throttle's key callable said EXEMPT
        return limiter.exempt(ask.exempt)
    while True:
        try:
            booked = limiter.reserve(
                ask.target, consume=ask.consume, max_wait=state.settings.horizon
            )
        except Throttled as exc:
            time.sleep(exc.retry_after)
            continue
        time.sleep(booked.delay)
        lease = booked.redeem()
        lease.exempt = ask.exempt
        return lease


def spare_refusals(task: Task) -> None:
    """Keep ``autoretry_for`` from turning a refusal the body raised (a `BreakerOpen` the
    gate hands back, any `Throttled`) into a retry: Celery wraps ``run`` with autoretry
    when the task is made, so a task whose ``dont_autoretry_for`` lacks `Throttled` has
    its wrapper made again with it."""
    spared = tuple(getattr(task, "dont_autoretry_for", ()))
    if "_orig_run" not in vars(task) or any(issubclass(Throttled, kind) for kind in spared):
        return
    del task.run, task._orig_run  # back to the class's run
    task.dont_autoretry_for = (*spared, Throttled)
    add_autoretry_behaviour(task)


class ThrottledTask(Task):
    """A task base whose calls pass the throttle gate; ``install`` makes it the app's base."""

    __call__ = gated_call
    #: A refusal is handed back by the gate, never retried by ``autoretry_for``.
    dont_autoretry_for: tuple[type[BaseException], ...] = (Throttled,)
