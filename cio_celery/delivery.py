"""One operation's delivery attempt, the body of every operation task: decide, then act.

:func:`decide` is a flat run of early exits, each returning one
:mod:`outcome <cio_celery.outcomes>`; it takes the guards (claim, breaker permit, rate-limit
slot) through a :class:`~cio_celery.guard.Guard`, which gives them back whatever happens.
:func:`act` performs exactly one action for the outcome. :func:`deliver` puts one catch-all
around both: an exception while deciding becomes an outcome (:func:`policy.after_exception`),
and an action that fails becomes a requeue. So every path ends in an acknowledgement after a
decision was carried out, or in the message going back to the broker; none ends in an
exception that Celery would acknowledge and drop.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from celery.exceptions import Reject, Retry

from . import policy
from .client import clients_for
from .coalesce import MAX_ENTRY, coalescing
from .deadletters import DeadLetters, is_full_error
from .exceptions import PermanentError, TransientError, ValidationError
from .fallback import Fallback
from .guard import Guard
from .ledger import Ledger, ledger_enabled
from .meta import META_KEY, Meta, internal_publish
from .operations import BATCHABLE, api_of, perform
from .outcomes import Coalesced, DeadLetter, Delivered, Outcome, Park, Requeue, Suppressed
from .outcomes import Retry as RetryOutcome
from .settings import Settings
from .store import key, redis_for, run_scripts
from .validation import normalize

__all__ = ["REQUEUE_PAUSE", "Attempt", "Ending", "act", "decide", "deliver", "missing_credential"]

logger = logging.getLogger("cio_celery")

# A message handed back to the broker comes back at once; a short pause keeps a store or broker
# that fails every action from turning the worker into a busy loop.
REQUEUE_PAUSE = 1.0


def log(level: int, event: str, task: Any, outcome: str, **extra: Any) -> None:
    """One structured log line; never ids, emails or attribute values."""
    if not logger.isEnabledFor(level):
        return
    fields = {
        "cio_event": event,
        "cio_operation": getattr(task, "operation", "?"),
        "cio_task_id": task.request.id,
        "cio_attempt": (task.request.retries or 0) + 1,
        "cio_outcome": outcome,
        **{f"cio_{k}": v for k, v in extra.items()},
    }
    text = " ".join(f"{k[4:]}={v}" for k, v in fields.items() if v is not None)
    logger.log(level, "cio_celery %s", text, extra=fields)


@dataclass(frozen=True)
class Attempt:
    """What one attempt works on: the message, read once."""

    task: Any
    settings: Settings
    operation: str
    task_id: str
    retries: int
    meta: Meta
    args: tuple[Any, ...]  # normalised when valid, as received otherwise
    kwargs: dict[str, Any]
    invalid: str | None = None  # the field that failed validation on the worker
    broken: str | None = None  # the type of an unexpected error while reading the message

    @property
    def spent(self) -> int:
        return self.meta.spent(self.retries)

    def message_kwargs(self, meta: Meta) -> dict[str, Any]:
        """The keyword arguments of a message carrying this operation with ``meta``."""
        return {**self.kwargs, META_KEY: meta.as_dict()}


@dataclass
class Ending:
    """What the task does once the action is performed: return ``result`` or raise ``error``."""

    result: Any = None
    error: BaseException | None = None
    acted: bool = True  # False: the action failed and the message goes back to the broker

    def finish(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def start(task: Any, settings: Settings, args: Sequence[Any], kwargs: Mapping[str, Any], raw_meta: Any) -> Attempt:
    """Read the message once; never raises (a message that cannot be read is an outcome)."""
    op = task.operation
    task_id = str(task.request.id or "")
    meta = Meta.parse(raw_meta, task_id)
    common = {"task": task, "settings": settings, "operation": op, "task_id": task_id,
              "retries": int(task.request.retries or 0), "meta": meta}
    try:
        nargs, nkwargs = normalize(op, tuple(args), dict(kwargs))
    except ValidationError as exc:
        # A message from an older or foreign producer: retrying cannot fix it.
        return Attempt(args=tuple(args), kwargs=dict(kwargs), invalid=exc.field, **common)
    except Exception as exc:  # noqa: BLE001 - a message that breaks the reader is kept, not dropped
        return Attempt(args=tuple(args), kwargs=dict(kwargs), broken=type(exc).__name__, **common)
    return Attempt(args=tuple(nargs), kwargs=dict(nkwargs), **common)


def missing_credential(operation: str, settings: Settings) -> str | None:
    """The environment variable an operation's credentials lack, if any."""
    if api_of(operation) == "app":
        return None if settings.app_api_key else "CIO_APP_API_KEY"
    if not settings.site_id:
        return "CIO_SITE_ID"
    return None if settings.track_api_key else "CIO_TRACK_API_KEY"


def deliver(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any], raw_meta: Any) -> Any:
    """Run one attempt of the operation: decide, then act, one catch-all around both."""
    try:
        settings = task.cio_settings
    except Exception as exc:  # noqa: BLE001 - invalid settings: the worker's start-up check names them
        log(logging.ERROR, "settings_invalid", task, "requeued", error=type(exc).__name__,
            setting=getattr(exc, "setting", None))
        time.sleep(REQUEUE_PAUSE)
        raise Reject("cio_celery settings are invalid", requeue=True) from None
    attempt = start(task, settings, args, kwargs, raw_meta)
    if attempt.meta.problems:
        log(logging.WARNING, "metadata_repaired", task, "continue", fields=",".join(attempt.meta.problems))
    ledger = Ledger(settings) if ledger_enabled(settings, task.app) else None
    with Guard(settings, attempt.operation, attempt.meta.key, attempt.task_id, ledger) as guard:
        try:
            outcome = decide(attempt, guard)
        except Exception as exc:  # noqa: BLE001 - the catch-all: anything becomes a decision
            outcome = policy.after_exception(exc, attempt.meta, settings)
            _log_exception(task, exc, outcome)
        # A dead letter keeps its claim, to mark it in the dead letter's own script.
        guard.settle(hold=isinstance(outcome, DeadLetter), ended=isinstance(outcome, Suppressed))
        ending = act(attempt, outcome, guard)
        guard.release_held(acted=ending.acted)
    return ending.finish()


def decide(attempt: Attempt, guard: Guard) -> Outcome:
    """The outcome of one attempt; takes the guards and makes at most one call."""
    s, op, meta = attempt.settings, attempt.operation, attempt.meta
    if attempt.invalid is not None:
        return DeadLetter(f"invalid:{attempt.invalid}")
    if attempt.broken is not None:
        return DeadLetter(f"internal:{attempt.broken}")
    missing = missing_credential(op, s)
    if missing is not None:
        log(logging.ERROR, "not_configured", attempt.task, "dead_letter", missing=missing,
            detail=f"{missing} is not set")
        return DeadLetter("not_configured")
    try:
        guard.take(meta.slot, _coalesce_entry(attempt, guard), _behind(attempt))
    except Exception as exc:
        if not (policy.is_store_unavailable(exc) and s.breaker_on_store_error == "allow"):
            raise
        # breaker_on_store_error = allow: call Customer.io unguarded (no claim, no permit).
        log(logging.WARNING, "store_unavailable", attempt.task, "unguarded", error=type(exc).__name__)
        guard.unguard()
    if guard.coalesced:
        return Coalesced()
    claim, permit, slot = guard.claim, guard.permit, guard.slot
    if claim is not None and claim.state in ("done", "dead"):
        # Delivered, or in dead letters, already: this is a redelivered or repeated copy.
        return Suppressed()
    if claim is not None and claim.state == "held":
        return policy.claim_held(claim.held_for, meta, s, random.random())
    if meta.dead_reason:
        # Decided on an earlier attempt, when dead letters had no room: never called again.
        return DeadLetter(meta.dead_reason, meta.dead_status or None, in_doubt=True)
    if permit is not None and not permit.allowed:
        return Park(permit.retry_after)
    if claim is not None and claim.lost_attempts > s.max_retries:
        # Killed mid-call again and again (out of memory, a hang past the hard time limit).
        return DeadLetter("worker_lost_repeatedly")
    if claim is not None and claim.recovered and policy.review_ambiguous(op, s):
        # The previous attempt's worker died mid-call: the send may have gone out.
        return DeadLetter("ambiguous:worker_lost", in_doubt=True)
    if slot is not None and not slot.granted:
        return policy.rate_limited(slot.wait, slot.reserved, meta, s, random.random())
    if slot is not None and slot.wait > 0 and (permit is None or permit.decision == "allow"):
        # A reserved slot a few milliseconds away. A half-open probe does not wait: the K
        # probes must answer together, before the first failure reopens the breaker.
        time.sleep(slot.wait)
        permit = guard.reacquire()
        if permit is not None and not permit.allowed:
            return Park(permit.retry_after)
    facts, error = guard.call(lambda: perform(clients_for(s), op, list(attempt.args), dict(attempt.kwargs),
                                              meta.event_id))
    if error is None:
        return Delivered(facts or {})
    error.for_operation(op)
    return policy.after_failure(op, error, meta, attempt.retries, s)


def _behind(a: Attempt) -> bool:
    """Whether the message waited in its queue longer than the batching linger (a backlog)."""
    at = a.meta.published_at
    if at is None:
        return False
    eta = getattr(a.task.request, "eta", None)
    if eta:
        try:
            at = max(at, datetime.fromisoformat(str(eta)).timestamp())
        except ValueError:
            return False
    return time.time() - at > a.settings.batch_linger


def _coalesce_entry(a: Attempt, guard: Guard) -> str | None:
    """The buffer entry of a batchable operation that may be coalesced, else None."""
    m = a.meta
    if a.operation not in BATCHABLE or m.alone or m.slot or not coalescing(a.settings, guard.limiter):
        return None
    kwargs = a.message_kwargs(m)
    entry = json.dumps({"operation": a.operation, "task_id": a.task_id, "args": list(a.args), "kwargs": kwargs},
                       separators=(",", ":"))
    # Too large for a batch item: it goes alone (the buffer would hold it for nothing).
    return entry if len(entry) <= MAX_ENTRY else None


def act(attempt: Attempt, outcome: Outcome, guard: Guard) -> Ending:
    """Perform the one action of ``outcome``; an action that fails becomes a requeue."""
    action = _ACTIONS[type(outcome)]
    try:
        return action(attempt, outcome, guard)
    except Exception as exc:  # noqa: BLE001 - the action failed: the broker keeps the message
        what = type(outcome).__name__.lower()
        log(logging.ERROR, f"{what}_failed", attempt.task, "requeue", error=type(exc).__name__)
        return _requeue(attempt, Requeue(f"{what} failed ({type(exc).__name__})"), guard)


def _delivered(a: Attempt, o: Delivered, _g: Guard) -> Ending:
    log(logging.INFO, "delivered", a.task, "delivered")
    return Ending(result={"delivered": True, "attempts": a.spent + 1, **o.facts})


def _suppressed(a: Attempt, o: Suppressed, _g: Guard) -> Ending:
    log(logging.INFO, "duplicate_suppressed", a.task, "suppressed")
    send_event(a.task, "task-cio-duplicate-suppressed")
    return Ending(result={"duplicate": True})


# The log event of a retry by its reason ("retry" for a failed call).
_RETRY_EVENTS = {"claimed_elsewhere": "claim_held", "rate_limited": "rate_limited",
                 "store_unavailable": "store_unavailable", "store_error": "store_error",
                 "fallback_full": "store_full", "dead_letters_full": "store_full"}


def _retry(a: Attempt, o: RetryOutcome, _g: Guard) -> Ending:
    _count_retry(a.settings, o.reason)
    event = _RETRY_EVENTS.get(o.reason, "retry")
    log(logging.WARNING if event in {"retry", "store_unavailable", "store_error", "store_full"} else logging.INFO,
        event, a.task, "retry", reason=o.reason, countdown=round(o.countdown, 3), free=o.free or None)
    exc = TransientError(a.operation, o.reason, status=o.status)
    try:
        with internal_publish():
            a.task.retry(args=list(a.args), kwargs=a.message_kwargs(o.meta), countdown=o.countdown, exc=exc)
    except Retry as published:
        return Ending(error=published)
    # Task.retry returns only when told not to throw; it was not told so.
    raise RuntimeError("Task.retry returned without raising Retry")


def _park(a: Attempt, o: Park, g: Guard) -> Ending:
    """Reroute to the fallback store: no call, no attempt spent, no ETA held in memory."""
    meta = a.meta.changed(attempts_before=a.spent, free=0, slot=0)
    entry = {"operation": a.operation, "task_id": a.task_id, "args": list(a.args), "kwargs": a.message_kwargs(meta)}
    # Parked, it is in the fallback store: its ledger entry goes in the same script.
    try:
        depth = int(run_scripts(a.settings, [Fallback(a.settings, a.task.app).park_call([entry]),
                                             *g.ledger_clear_calls()])[0])
    except redis.ResponseError as exc:
        if not is_full_error(exc):
            raise
        return _retry(a, policy.store_full("fallback_full", a.meta, a.settings), g)
    log(logging.INFO, "parked", a.task, "parked", depth=depth, breaker_retry_after=round(o.retry_after, 3))
    send_event(a.task, "task-cio-rerouted", depth=depth)
    return Ending(result={"parked": True})


def _coalesced(a: Attempt, o: Coalesced, _g: Guard) -> Ending:
    log(logging.DEBUG, "coalesced", a.task, "coalesced")
    send_event(a.task, "task-cio-coalesced")
    return Ending(result={"coalesced": True})


def _dead_letter(a: Attempt, o: DeadLetter, g: Guard) -> Ending:
    # A replay starts with a fresh budget: only the key, the event id and the enqueue time go on.
    meta = Meta(key=a.meta.key, enqueued_at=a.meta.enqueued_at, event_id=a.meta.event_id)
    add = DeadLetters(a.settings, a.task.app).add_call(
        operation=a.operation, task_id=a.task_id, reason=o.reason, status=o.status, attempts=a.spent + 1,
        args=list(a.args), kwargs=a.message_kwargs(meta),
    )
    try:
        run_scripts(a.settings, [add, *g.dead_mark_calls(), *g.ledger_clear_calls()])
    except redis.ResponseError as exc:
        if not is_full_error(exc):
            raise
        # Nothing was written (the add refused first): the operation waits, its claim is released.
        return _retry(a, policy.store_full("dead_letters_full", a.meta, a.settings, o), g)
    g.dead_marked()
    log(logging.ERROR, "dead_lettered", a.task, "dead_letter", reason=o.reason, status=o.status)
    send_event(a.task, "task-cio-dead-lettered", reason=o.reason, status=o.status)
    # The task ends failed (Flower shows it), and the message is dropped: it is in dead letters.
    return Ending(error=PermanentError(a.operation, o.reason, status=o.status))


def _requeue(a: Attempt, o: Requeue, _g: Guard) -> Ending:
    log(logging.ERROR, "requeued", a.task, "requeue", why=o.why)
    send_event(a.task, "task-cio-requeued")
    time.sleep(REQUEUE_PAUSE)
    return Ending(error=Reject(o.why, requeue=True), acted=False)


_ACTIONS: dict[type, Callable[[Attempt, Any, Guard], Ending]] = {
    Delivered: _delivered,
    Suppressed: _suppressed,
    RetryOutcome: _retry,
    Park: _park,
    Coalesced: _coalesced,
    DeadLetter: _dead_letter,
    Requeue: _requeue,
}


def send_event(task: Any, type_: str, **fields: Any) -> None:
    """A custom Celery event (Flower counts them by type); monitoring never breaks a delivery."""
    if not task.app.conf.worker_send_task_events:
        return
    try:
        task.send_event(type_, **fields)
    except Exception:  # noqa: BLE001, S110 - monitoring must never break a delivery
        pass


def _count_retry(settings: Settings, reason: str) -> None:
    """Count the retry by reason in ``{prefix}:stats`` (Prometheus reads it); best effort."""
    try:
        redis_for(settings).hincrby(key(settings, "stats"), f"retry:{reason}", 1)
    except Exception:  # noqa: BLE001, S110 - a metric must never stop a retry
        pass


def _log_exception(task: Any, exc: BaseException, outcome: Outcome) -> None:
    if policy.is_store_unavailable(exc) or policy.is_store_state_error(exc):
        log(logging.WARNING, "store_error", task, type(outcome).__name__.lower(), error=type(exc).__name__,
            setting=getattr(exc, "setting", None))
        return
    # A bug or an unexpected library error: its text may hold payload, so only its type and
    # place go on.
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else None
    log(logging.ERROR, "internal_error", task, type(outcome).__name__.lower(), error=type(exc).__name__,
        where=where)
