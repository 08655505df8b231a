"""Batch delivery of a backlog through Customer.io's ``/api/v2/batch``.

After an outage the fallback store can hold tens of thousands of parked operations. One
request per operation at 100 requests/s drains 20,000 of them in more than three minutes;
one v2 batch carries up to 500 KB (each operation up to 32 KB), so the same backlog needs a
few dozen requests. When ``batch_drain`` is on and the breaker is closed, the releaser
packs parked Track-API operations into batches and publishes one ``cio_celery.deliver_batch``
task per batch; anything that cannot be batched is released one by one as before.

Idempotency is kept per item: the batch task claims every item's key (one pipelined round
trip, together with the breaker and the limiter), leaves out the items already done (counted
as suppressed) or held by another worker (parked again), and marks each item done or
releases it after the answer. A 207 partial failure dead-letters the failed items one by one
(``batch:<reason>``) and marks the rest done. A transient failure retries the batch with
backoff; a batch that keeps failing, or that Customer.io refuses as a whole, is split back
into single operations, each of which then gets its own verdict.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject, Retry
from celery.utils import uuid

from . import policy
from .client import clients_for
from .coalesce import batch_landed, batch_started
from .deadletters import DeadLetters, is_full_error
from .delivery import REQUEUE_PAUSE, Ending, send_event
from .exceptions import TransientError, ValidationError
from .fallback import Fallback, check_entry
from .guard import BatchGuard
from .ledger import Ledger, ledger_enabled
from .meta import META_KEY, Meta
from .operations import BATCHABLE, EVENT_ID_ARG
from .outcomes import DeadLetter, Delivered, Outcome, Park, Suppressed
from .outcomes import Retry as RetryOutcome
from .quarantine import Quarantine
from .settings import Settings, settings_for_app
from .store import combine, key, redis_for, run_pipelined
from .validation import BATCH_OPERATION_MAX_BYTES, normalize

__all__ = ["BATCHABLE", "BATCH_TASK", "pack", "to_v2"]

logger = logging.getLogger("cio_celery.batch")

BATCH_TASK = "cio_celery.deliver_batch"

BATCH_MAX_BYTES = 500_000
ITEM_MAX_BYTES = BATCH_OPERATION_MAX_BYTES
_FRAMING = len('{"batch":[]}')


def _person(customer_id: Any) -> dict[str, Any]:
    return {"type": "person", "identifiers": {"id": customer_id}}


def _event(action: str, customer_id: Any, name: str, data: dict[str, Any] | None, event_id: str | None,
           timestamp: Any = None, identifier: str = "id") -> dict[str, Any]:
    item: dict[str, Any] = {"type": "person", "identifiers": {identifier: customer_id}, "action": action,
                            "name": name, "attributes": dict(data or {})}
    if event_id:
        item["id"] = event_id
    if timestamp is not None:
        item["timestamp"] = int(timestamp)
    return item


def _device(action: str, customer_id: Any, device_id: Any, platform: str | None,
            data: dict[str, Any]) -> dict[str, Any]:
    """v1 sends ``{"device": {"id", "platform", **data}}``; v2 names the id ``token`` and keeps
    ``last_used`` beside it, the rest under ``attributes``."""
    device: dict[str, Any] = {"token": device_id}
    if platform is not None:
        device["platform"] = platform
    rest = dict(data)
    if "last_used" in rest:
        device["last_used"] = rest.pop("last_used")
    if rest:
        device["attributes"] = rest
    return {**_person(customer_id), "action": action, "device": device}


# Operation -> its v2 form from the normalised positional args, keyword args and event id.
_CONVERTERS: dict[str, Callable[[tuple[Any, ...], dict[str, Any], str | None], dict[str, Any]]] = {
    "identify": lambda a, kw, _e: {**_person(a[0]), "action": "identify", "attributes": dict(kw)},
    "track": lambda a, _kw, e: _event("event", a[0], a[1], a[2], a[3] or e, a[4]),
    "pageview": lambda a, kw, e: _event("page", a[0], a[1], kw, e),
    # An anonymous event without an anonymous id has no v2 form: it goes alone (see to_v2).
    "track_anonymous": lambda a, _kw, e: _event("event", a[0], a[1], a[2], a[3] or e, a[4], "anonymous_id"),
    "delete": lambda a, _kw, _e: {**_person(a[0]), "action": "delete"},
    "add_device": lambda a, kw, _e: _device("add_device", a[0], a[1], a[2], kw),
    "delete_device": lambda a, _kw, _e: _device("delete_device", a[0], a[1], None, {}),
    "merge_customers": lambda a, _kw, _e: {"type": "person", "action": "merge", "primary": {a[0]: a[1]},
                                           "secondary": {a[2]: a[3]}},
    "suppress": lambda a, _kw, _e: {**_person(a[0]), "action": "suppress"},
    "unsuppress": lambda a, _kw, _e: {**_person(a[0]), "action": "unsuppress"},
}
assert frozenset(_CONVERTERS) == BATCHABLE, "operations.BATCHABLE and the converters must agree"


def to_v2(operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], event_id: str | None
          ) -> dict[str, Any] | None:
    """The v2 batch operation for one normalised Track-API operation (None: it has none)."""
    if operation == "track_anonymous" and args[0] in (None, ""):
        return None
    return _CONVERTERS[operation](args, kwargs, event_id)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def v2_item(operation: str, args: Any, kwargs: Any) -> dict[str, Any] | None:
    """The v2 form of one operation as a message carries it (raises ValidationError); None when
    it must go alone (no v2 form, or over 32 KB)."""
    kw = dict(kwargs or {})
    meta = kw.pop(META_KEY, None)
    nargs, nkw = normalize(operation, tuple(args or ()), kw)
    event_id = meta.get("event_id") if isinstance(meta, dict) else None
    idx = EVENT_ID_ARG.get(operation)
    if idx is not None and len(nargs) > idx and nargs[idx]:
        event_id = nargs[idx]
    item = to_v2(operation, nargs, nkw, event_id)
    return item if item is not None and len(_dumps(item)) <= ITEM_MAX_BYTES else None


def _item_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The v2 form of a parked entry, or None when it must go alone."""
    op = entry.get("operation")
    if op not in BATCHABLE:
        return None
    try:
        return v2_item(str(op), entry.get("args"), entry.get("kwargs"))
    except ValidationError:
        return None  # alone, it is dead-lettered with its own reason


@dataclass
class Packed:
    batches: list[list[dict[str, Any]]]
    singles: list[dict[str, Any]]


def pack(entries: list[dict[str, Any]], max_bytes: int = BATCH_MAX_BYTES, max_items: int = 1000) -> Packed:
    """Group parked entries into batches under ``max_bytes`` of request body and ``max_items``."""
    batches: list[list[dict[str, Any]]] = []
    singles: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    size = _FRAMING
    for entry in entries:
        item = _item_of(entry)
        if item is None:
            singles.append(entry)
            continue
        n = len(_dumps(item)) + (1 if current else 0)
        if current and (size + n > max_bytes or len(current) >= max_items):
            batches.append(current)
            current, size = [], _FRAMING
            n = len(_dumps(item))
        current.append(entry)
        size += n
    if current:
        batches.append(current)
    return Packed(batches, singles)


def pack_raw(entries: list[tuple[dict[str, Any], int]], max_bytes: int = BATCH_MAX_BYTES,
             max_items: int = 1000) -> Packed:
    """Group batchable entries, in order, by their stored size (an upper bound of their v2 form)."""
    batches: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = _FRAMING
    for entry, n in entries:
        if current and (size + n + 1 > max_bytes or len(current) >= max_items):
            batches.append(current)
            current, size = [], _FRAMING
        current.append(entry)
        size += n + 1
    if current:
        batches.append(current)
    return Packed(batches, [])


class BatchTask(Task):  # type: ignore[misc]
    """The batch delivery task: late acks, requeued when its worker dies or hits the time limit."""

    ignore_result = True
    acks_late = True
    reject_on_worker_lost = True
    acks_on_timeout = False
    acks_on_failure_or_timeout = False
    max_retries = None
    typing = False
    serializer = "json"

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        """Hide the operations from Flower and the broker's headers on every publish, retries
        included (Celery's retry would show ``repr(args)``); carry the hard time limit."""
        settings = settings_for_app(self.app)
        group = (args or [[]])[0]
        n = len(group) if isinstance(group, list) else 0
        options.setdefault("argsrepr", f"<{n} operation{'' if n == 1 else 's'} hidden>")
        options.setdefault("kwargsrepr", "<batch metadata>")
        options.setdefault("time_limit", settings.task_time_limit)
        at = round(time.time(), 6)
        kwargs = dict(kwargs or {})
        kwargs[META_KEY] = {**(kwargs.get(META_KEY) or {}), "at": at}
        if ledger_enabled(settings, self.app):
            # One record for the whole message (not one per item: a drained batch of 1,000 cost
            # ~500 ms of Lua that way). Lost in transit, the sweeper republishes the batch with
            # its task id; the items' claims suppress what was already delivered.
            options["task_id"] = task_id = str(options.get("task_id") or uuid())
            queue = str(options.get("queue") or options.get("routing_key") or settings.fallback_queue)
            try:
                ledger = Ledger(settings)
                ledger.record_now([ledger.record_message_call(self.name, task_id, args, kwargs, queue, at)])
            except Exception as exc:  # noqa: BLE001 - the ledger is a safety net; the publish goes on
                logger.warning("cio_celery ledger: batch not recorded (%s)", type(exc).__name__)
        return super().apply_async(args, kwargs, *rest, **options)


@dataclass
class Item:
    """One parked operation inside a batch message."""

    entry: dict[str, Any]
    meta: Meta
    v2: dict[str, Any] | None = None  # its /api/v2/batch form; None: it goes alone

    @property
    def operation(self) -> str:
        return str(self.entry["operation"])

    @property
    def task_id(self) -> str:
        return str(self.entry["task_id"])

    def with_meta(self, meta: Meta) -> dict[str, Any]:
        """The entry carrying ``meta``, as it is parked, dead-lettered or published alone."""
        return {**self.entry, "kwargs": {**self.entry["kwargs"], META_KEY: meta.as_dict()}}


# An item published alone, to get its own verdict (not batchable, or the batch was refused).
ALONE = RetryOutcome(0.0, "batch_split", True, Meta(key=""))


@dataclass
class Plan:
    """The outcome of a batch: one per item, and the batch's own retry for the undecided ones."""

    items: list[Item]
    outcomes: list[Outcome | None]
    unreadable: list[tuple[Any, str]] = field(default_factory=list)
    retry: RetryOutcome | None = None
    position: dict[int, int] = field(default_factory=dict)  # item index -> its claim's position

    def undecided(self) -> list[int]:
        return [i for i, o in enumerate(self.outcomes) if o is None]

    def decide(self, indexes: list[int], outcome: Outcome) -> None:
        for i in indexes:
            self.outcomes[i] = outcome


def read_items(entries: Any) -> Plan:
    """Read a batch message once; never raises. Unreadable entries go to the quarantine."""
    plan = Plan([], [])
    for entry in entries if isinstance(entries, list) else []:
        why = check_entry(entry)
        if why:
            plan.unreadable.append((entry, why))
            continue
        meta = Meta.parse(entry["kwargs"].get(META_KEY), entry["task_id"])
        item = Item(entry, meta)
        plan.items.append(item)
        plan.outcomes.append(None)
        if entry["operation"] not in BATCHABLE:
            plan.outcomes[-1] = ALONE
            continue
        try:
            v2 = v2_item(item.operation, entry["args"], entry["kwargs"])
        except ValidationError as exc:
            plan.outcomes[-1] = DeadLetter(f"invalid:{exc.field}")
            continue
        except Exception as exc:  # noqa: BLE001 - kept for a human, never dropped
            plan.outcomes[-1] = DeadLetter(f"internal:{type(exc).__name__}")
            continue
        if v2 is None:
            plan.outcomes[-1] = ALONE
        else:
            item.v2 = v2
    return plan


def _failed_positions(response: Any) -> set[int]:
    """Positions in the request of the items a 207 answer refused."""
    if response.status_code != 207:
        return set()
    return {int(err["batch_index"]) for err in response.json().get("errors", [])}


def _reasons(response: Any) -> dict[int, str]:
    try:
        return {int(e["batch_index"]): str(e.get("reason") or "rejected")[:40]
                for e in response.json().get("errors", [])}
    except Exception:  # noqa: BLE001 - an unreadable body: the generic reason
        return {}


def decide(task: Any, plan: Plan, batch_meta: Meta, guard: BatchGuard) -> None:
    """Decide each item's outcome, writing into ``plan``; makes at most one call."""
    s = settings_for_app(task.app)
    todo = plan.undecided()
    if not todo:
        return
    claims = guard.take([(plan.items[i].operation, plan.items[i].meta.key, plan.items[i].task_id) for i in todo],
                        batch_meta.slot)
    claimed: list[tuple[int, int]] = []  # (position in the guard, item index)
    for pos, (i, claim) in enumerate(zip(todo, claims, strict=True)):
        plan.position[i] = pos
        if claim is None or claim.owned:
            if claim is not None and claim.lost_attempts > s.max_retries:
                plan.outcomes[i] = DeadLetter("worker_lost_repeatedly")
                guard.hold([pos])
            elif claim is not None and claim.recovered:
                # An earlier attempt died mid-call (a batch killed by the time limit, a worker
                # SIGKILLed): alone from now on, so that an operation that kills its worker
                # every time is dead-lettered by itself, not with the batch it came in.
                plan.outcomes[i] = ALONE
                guard.untried([pos])
            else:
                claimed.append((pos, i))
        elif claim.state in ("done", "dead"):
            plan.outcomes[i] = Suppressed()
        else:  # another worker is delivering it: look again later
            plan.outcomes[i] = Park(claim.held_for)
    if not claimed:
        return
    indexes = [i for _pos, i in claimed]
    permit, slot = guard.permit, guard.slot
    if permit is not None and not permit.allowed:
        plan.decide(indexes, Park(permit.retry_after))
        return
    if slot is not None and not slot.granted:
        plan.retry = policy.rate_limited(slot.wait, slot.reserved, batch_meta, s, random.random())
        return
    if slot is not None and slot.wait > 0 and (permit is None or permit.decision == "allow"):
        time.sleep(slot.wait)
        permit = guard.reacquire()
        if permit is not None and not permit.allowed:
            plan.decide(indexes, Park(permit.retry_after))
            return
    body = [v2 for i in indexes if (v2 := plan.items[i].v2) is not None]
    response, failed, error = guard.call(lambda: clients_for(s).track.batch(body), _failed_positions,
                                         [pos for pos, _i in claimed])
    if error is None:
        reasons = _reasons(response) if failed else {}
        for n, (pos, i) in enumerate(claimed):
            plan.outcomes[i] = DeadLetter(f"batch:{reasons.get(n, 'rejected')}", 207) if pos in failed \
                else Delivered()
        return
    error.for_operation("batch")
    outcome = policy.after_failure("batch", error, batch_meta, task.request.retries or 0, s) \
        if isinstance(error, TransientError) else None
    if isinstance(outcome, RetryOutcome):
        plan.retry = outcome
        return
    # Refused as a whole, or out of retries: each operation alone gets its own verdict.
    plan.decide(indexes, ALONE)


@shared_task(bind=True, base=BatchTask, name=BATCH_TASK)  # type: ignore[untyped-decorator]
def deliver_batch(self: BatchTask, entries: list[dict[str, Any]], slot: int = 0,
                  _cio: dict[str, Any] | None = None) -> Any:
    """Deliver parked operations in one ``/api/v2/batch`` request (see the module docstring)."""
    settings = settings_for_app(self.app)
    counted = str(self.request.id) if settings.batch_max_in_flight and self.request.id else None
    if counted:
        batch_started(settings, counted)
    try:
        return _deliver_batch(self, settings, entries, slot, _cio)
    finally:
        if counted:
            batch_landed(settings, counted)


def _deliver_batch(self: BatchTask, settings: Settings, entries: list[dict[str, Any]], slot: int,
                   _cio: dict[str, Any] | None) -> Any:
    batch_meta = Meta.parse(_cio, str(self.request.id or ""))
    if slot and not batch_meta.slot:
        batch_meta = batch_meta.changed(slot=int(slot) if isinstance(slot, int) else 0)
    plan = read_items(entries)
    ledger = Ledger(settings) if ledger_enabled(settings, self.app) else None
    with BatchGuard(settings, ledger) as guard:
        try:
            decide(self, plan, batch_meta, guard)
        except Exception as exc:  # noqa: BLE001 - the catch-all: anything becomes a decision
            outcome = policy.after_exception(exc, batch_meta, settings)
            if isinstance(outcome, RetryOutcome):
                plan.retry = outcome
            else:
                plan.decide(plan.undecided(), outcome)
            logger.warning("cio_celery batch %s: %s", type(outcome).__name__.lower(), type(exc).__name__,
                           extra={"cio_event": "batch_error", "cio_error": type(exc).__name__})
        guard.settle()
        ending = act(self, settings, plan, guard)
        guard.release_held(acted=ending.acted)
    return ending.finish()


def act(task: Any, settings: Settings, plan: Plan, guard: BatchGuard) -> Ending:
    """Perform each item's action, then the batch's retry; any failure requeues the whole batch
    (already settled items come back as suppressed duplicates or are decided again)."""
    counts: dict[str, int] = {}
    try:
        if plan.unreadable:
            quarantine = Quarantine(settings)
            for entry, why in plan.unreadable:
                quarantine.add("batch", json.dumps(entry, default=repr).encode(), why)
        dead = [(i, o) for i, o in enumerate(plan.outcomes) if isinstance(o, DeadLetter)]
        letters = DeadLetters(settings, task.app)
        writes = []
        for i, o in dead:
            item = plan.items[i]
            fresh = Meta(key=item.meta.key, enqueued_at=item.meta.enqueued_at, event_id=item.meta.event_id)
            e = item.with_meta(fresh)
            add = letters.add_call(operation=item.operation, task_id=item.task_id, reason=o.reason,
                                   status=o.status, attempts=1, args=e["args"], kwargs=e["kwargs"])
            pos = plan.position.get(i)
            # Each dead letter with its claim's mark, atomically; all of them in one round trip.
            writes.append(combine([add, *(guard.dead_mark_calls(pos) if pos is not None else [])]))
        if writes:
            run_pipelined(settings, writes)
            guard.dead_marked([p for i, _o in dead if (p := plan.position.get(i)) is not None])
        fallback = Fallback(settings, task.app)
        parked = [plan.items[i].with_meta(plan.items[i].meta.changed(slot=0))
                  for i, o in enumerate(plan.outcomes) if isinstance(o, Park)]
        if parked:
            fallback.park_many(parked)
        if guard.ledger is not None:
            ended = [plan.items[i].task_id for i, o in enumerate(plan.outcomes)
                     if isinstance(o, (Suppressed, DeadLetter, Park))]
            if plan.retry is None and task.request.id:
                ended.append(str(task.request.id))  # the batch's own record: every item has an outcome
            if ended:
                run_pipelined(settings, [guard.ledger.clear_call(ended)])
        alone = [plan.items[i] for i, o in enumerate(plan.outcomes) if o is ALONE]
        for item in alone:
            # Alone for good: it is never coalesced into a batch again.
            fallback.publish(item.with_meta(item.meta.changed(slot=0, alone=1)))
        counts = {
            "delivered": sum(isinstance(o, Delivered) for o in plan.outcomes),
            "suppressed": sum(isinstance(o, Suppressed) for o in plan.outcomes),
            "parked": len(parked), "dead_lettered": len(dead), "alone": len(alone),
            "quarantined": len(plan.unreadable),
            "retrying": len(plan.undecided()) if plan.retry is not None else 0,
        }
        _log_batch(task, counts, plan.retry)
        _count_batch(settings, counts)
        if plan.retry is not None:
            retry_entries = [plan.items[i].entry for i in plan.undecided()]
            exc = TransientError("batch", plan.retry.reason, status=plan.retry.status)
            try:
                task.retry(args=[retry_entries], kwargs={META_KEY: plan.retry.meta.as_dict()},
                           countdown=plan.retry.countdown, exc=exc)
            except Retry as published:
                return Ending(result=counts, error=published)
            raise RuntimeError("Task.retry returned without raising Retry")
        if plan.undecided():
            raise RuntimeError("batch items left without an outcome")
        return Ending(result=counts)
    except Exception as exc:  # noqa: BLE001 - an action failed: the broker keeps the whole batch
        if is_full_error(exc):
            # Dead letters or the fallback are full: the whole batch again in a minute (what
            # was delivered meanwhile comes back as suppressed duplicates).
            try:
                task.retry(countdown=min(policy.FULL_WAIT, settings.max_countdown),
                           exc=TransientError("batch", "store_full"))
            except Retry as published:
                logger.warning("cio_celery batch waits: a capped store is full",
                               extra={"cio_event": "store_full"})
                return Ending(error=published)
            except Exception:  # noqa: BLE001, S110 - not published: requeued below
                pass
        logger.error("cio_celery batch requeued (%s failed)", type(exc).__name__,
                     extra={"cio_event": "batch_requeued", "cio_error": type(exc).__name__})
        time.sleep(REQUEUE_PAUSE)
        return Ending(error=Reject(f"batch action failed ({type(exc).__name__})", requeue=True), acted=False)


# Batch sizes counted in {prefix}:stats by their upper bound (Prometheus reads them).
SIZE_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def _count_batch(settings: Settings, counts: dict[str, int]) -> None:
    """Count a batch request that delivered operations (best effort: a metric never fails it)."""
    n = counts.get("delivered", 0)
    if not n:
        return
    bucket = next((b for b in SIZE_BUCKETS if n <= b), SIZE_BUCKETS[-1])
    try:
        pipe = redis_for(settings).pipeline(transaction=False)
        stats = key(settings, "stats")
        pipe.hincrby(stats, "batch:requests", 1)
        pipe.hincrby(stats, "batch:delivered", n)
        pipe.hincrby(stats, f"batch:size_le_{bucket}", 1)
        pipe.execute()
    except Exception:  # noqa: BLE001, S110 - a metric must never fail a delivery
        pass


def _log_batch(task: Any, counts: dict[str, int], retry: RetryOutcome | None) -> None:
    text = " ".join(f"{k}={v}" for k, v in counts.items() if v)
    if retry is not None:
        text += f" retry={retry.reason} countdown={retry.countdown:.3f}"
    logger.info("cio_celery batch %s", text or "empty",
                extra={"cio_event": "batch", "cio_task_id": task.request.id, **{f"cio_{k}": v
                                                                              for k, v in counts.items()}})
    send_event(task, "task-cio-batch", **counts)


