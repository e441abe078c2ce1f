"""The gate every throttled task passes in the worker, right before its body.

It runs in the task's ``__call__``, inside Celery's tracer, where ``Ignore`` and
``Reject`` are honoured (signal handlers cannot stop a task). A task that must wait
books a reservation and hands a copy of itself (same id, arguments, headers, links,
chain, retries) back to the broker for its turn, or parks it in the store when the turn
is far away; the current delivery is then acknowledged without running. The copy
finds its reservation in a header and runs without acquiring again.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject
from kombu.serialization import dumps, loads

from taskthrottle._exceptions import InvalidInput, StoreError, Throttled
from taskthrottle._lease import Lease
from taskthrottle._settings import Defer, State, book_turn, settle
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
    lease = _eager(state, ask) if task.request.is_eager else _admit(task, state, ask)
    if lease is None:
        return _body(task, args, kwargs)
    with lease_scope(lease):
        try:
            result = _body(task, args, kwargs)
        except BaseException:
            settle(lease, state.settings, failed=True)
            raise
    settle(lease, state.settings, failed=False)
    return result


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


def _admit(task: Task, state: State, ask: Request) -> Lease | None:
    """The lease to run under now; otherwise the task is deferred (Ignore or Reject)."""
    request = task.request
    meta = meta_of(request)
    if not _current_copy(task, state, meta):
        log.info("taskthrottle: dropping a stale copy of %s[%s]", task.name, request.id)
        raise Ignore()
    turn = book_turn(state, ask, request.id, meta)
    if isinstance(turn, Defer):
        return _defer(task, state, turn.meta, turn.wait)
    return turn


def _current_copy(task: Task, state: State, meta: dict[str, Any]) -> bool:
    """False for a delivery that another copy of the task has superseded: the original
    redelivered after it was deferred, or a copy published twice."""
    token = meta.get("token")
    if token is None and not (task.request.delivery_info or {}).get("redelivered"):
        return True  # a first delivery of a task never deferred: nothing to check
    try:
        return state.deferrals().begin(task.request.id, token)
    except StoreError:
        return True  # cannot tell: at-least-once beats losing the task


def _defer(task: Task, state: State, meta: dict[str, Any], wait: float) -> Lease | None:
    """Hand the task back for ``wait`` seconds from now, then skip this delivery.

    A near turn goes to the broker with a countdown; a far one is parked in the store.
    If neither works the task is not lost: under ``acks_late`` the message is requeued;
    otherwise (it is acknowledged already) it runs now, unthrottled.
    """
    request = task.request
    headers = {**(request.headers or {}), HEADER: meta}
    deferrals = state.deferrals()
    try:
        if wait > state.settings.park_after:
            copy = task.signature_from_request(request, headers=headers)
            deferrals.park(request.id, wait, encode(task.app, dict(copy)))
        else:
            meta["token"] = token = uuid.uuid4().hex
            copy = task.signature_from_request(request, countdown=max(wait, 0.001), headers=headers)
            copy.apply_async()
            # Only a published copy may make the original stale: had the publish failed,
            # the requeued original would have been dropped as stale, and the task lost.
            deferrals.expect(request.id, token, prior=meta_of(request).get("token"))
    except Exception as exc:
        if task.acks_late:  # still ours to hand back: the broker redelivers it
            raise Reject(exc, requeue=True) from exc
        log.exception("taskthrottle: could not defer %s[%s]; running it now", task.name, request.id)
        return None
    raise Ignore()


def encode(app: Any, message: dict[str, Any]) -> bytes:
    """A parked task as bytes, in the app's task serializer."""
    content_type, encoding, body = dumps(message, serializer=app.conf.task_serializer)
    data = body if isinstance(body, bytes) else body.encode(encoding)
    return f"{content_type}\n{encoding}\n".encode() + data


def decode(payload: bytes) -> dict[str, Any]:
    """A parked task back from `encode`."""
    content_type, encoding, body = payload.split(b"\n", 2)
    found: dict[str, Any] = loads(body, content_type.decode(), encoding.decode())
    return found


def _eager(state: State, ask: Request) -> Lease | None:
    """Eager mode has no queue to come back through: wait inline for the turn, or bypass."""
    if state.settings.eager == "bypass":
        return None
    limiter = state.limiter()
    while True:
        try:
            booked = limiter.reserve(
                ask.target, consume=ask.consume, max_wait=state.settings.horizon
            )
        except Throttled as exc:
            time.sleep(exc.retry_after)
            continue
        time.sleep(booked.delay)
        return booked.redeem()


class ThrottledTask(Task):
    """A task base whose calls pass the throttle gate; ``install`` makes it the app's base."""

    __call__ = gated_call
