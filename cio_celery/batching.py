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
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task, shared_task

from .backoff import retry_delay
from .breaker import breaker_for
from .client import clients_for
from .deadletters import DeadLetters
from .exceptions import PermanentError, TransientError, ValidationError
from .fallback import Fallback
from .idempotency import Claim, Claims
from .limiter import Limiter
from .operations import EVENT_ID_ARG, META_KEY
from .settings import Settings, settings_for_app
from .store import ScriptCall, run_pipelined
from .validation import normalize

__all__ = ["BATCHABLE", "BATCH_TASK", "pack", "to_v2"]

logger = logging.getLogger("cio_celery.batch")

BATCH_TASK = "cio_celery.deliver_batch"

BATCH_MAX_BYTES = 500_000
ITEM_MAX_BYTES = 32_000
_FRAMING = len('{"batch":[]}')


def _person(customer_id: Any) -> dict[str, Any]:
    return {"type": "person", "identifiers": {"id": customer_id}}


def _event(action: str, customer_id: Any, name: str, data: dict[str, Any] | None, event_id: str | None,
           timestamp: Any = None) -> dict[str, Any]:
    item = {**_person(customer_id), "action": action, "name": name, "attributes": dict(data or {})}
    if event_id:
        item["id"] = event_id
    if timestamp is not None:
        item["timestamp"] = int(timestamp)
    return item


# Operation -> its v2 form from the normalised positional args, keyword args and event id.
_CONVERTERS: dict[str, Callable[[tuple[Any, ...], dict[str, Any], str | None], dict[str, Any]]] = {
    "identify": lambda a, kw, _e: {**_person(a[0]), "action": "identify", "attributes": dict(kw)},
    "track": lambda a, _kw, e: _event("event", a[0], a[1], a[2], a[3] or e, a[4]),
    "pageview": lambda a, kw, e: _event("page", a[0], a[1], kw, e),
    "delete": lambda a, _kw, _e: {**_person(a[0]), "action": "delete"},
    "suppress": lambda a, _kw, _e: {**_person(a[0]), "action": "suppress"},
    "unsuppress": lambda a, _kw, _e: {**_person(a[0]), "action": "unsuppress"},
}
BATCHABLE = frozenset(_CONVERTERS)


def to_v2(operation: str, args: tuple[Any, ...], kwargs: dict[str, Any], event_id: str | None) -> dict[str, Any]:
    """The v2 batch operation for one normalised Track-API operation."""
    return _CONVERTERS[operation](args, kwargs, event_id)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _item_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The v2 form of a parked entry, or None when it must go alone."""
    op = entry.get("operation")
    if op not in BATCHABLE:
        return None
    kwargs = dict(entry.get("kwargs") or {})
    meta = kwargs.pop(META_KEY, None) or {}
    try:
        args, kw = normalize(op, tuple(entry.get("args") or ()), kwargs)
    except ValidationError:
        return None  # alone, it is dead-lettered with its own reason
    event_id = meta.get("event_id")
    idx = EVENT_ID_ARG.get(op)
    if idx is not None and len(args) > idx and args[idx]:
        event_id = args[idx]
    item = to_v2(op, args, kw, event_id)
    return item if len(_dumps(item)) <= ITEM_MAX_BYTES else None


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


class BatchTask(Task):  # type: ignore[misc]
    """The batch delivery task: late acks, requeued when its worker dies or hits the time limit."""

    ignore_result = True
    acks_late = True
    reject_on_worker_lost = True
    acks_on_timeout = False
    acks_on_failure_or_timeout = False
    acks_on_failure = True
    max_retries = None
    typing = False

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        """Hide the operations from Flower and the broker's headers on every publish, retries
        included (Celery's retry would show ``repr(args)``)."""
        group = (args or [[]])[0]
        options.setdefault("argsrepr", f"<{len(group)} operations hidden>")
        options.setdefault("kwargsrepr", repr(dict(kwargs or {})))  # only the rate-limit slot
        return super().apply_async(args, kwargs, *rest, **options)


def _release_singles(app: Any, settings: Settings, entries: list[dict[str, Any]]) -> None:
    """Publish entries one by one to the fallback queue (their own path, their own verdict)."""
    fallback = Fallback(settings, app)
    for entry in entries:
        fallback.publish(entry)


@shared_task(bind=True, base=BatchTask, name=BATCH_TASK)  # type: ignore[untyped-decorator]
def deliver_batch(self: BatchTask, entries: list[dict[str, Any]], slot: int = 0) -> dict[str, Any]:
    """Deliver parked operations in one ``/api/v2/batch`` request (see the module docstring)."""
    app = self.app
    settings = settings_for_app(app)
    claims = Claims(settings)
    breaker = breaker_for(settings) if settings.breaker_enabled else None
    limiter = Limiter(settings)
    items: list[tuple[dict[str, Any], dict[str, Any]]] = []
    alone: list[dict[str, Any]] = []
    for entry in entries:
        item = _item_of(entry)
        if item is None:
            alone.append(entry)
        else:
            items.append((entry, item))
    if alone:
        _release_singles(app, settings, alone)
    if not items:
        return {"delivered": 0}

    calls: list[ScriptCall] = []
    claim_meta: list[tuple[tuple[str, str], str]] = []
    for entry, _item in items:
        meta = (entry.get("kwargs") or {}).get(META_KEY) or {}
        call, keys, token = claims.claim_call(entry["operation"], str(meta.get("key") or entry["task_id"]))
        calls.append(call)
        claim_meta.append((keys, token))
    permit_token = ""
    if breaker is not None:
        acquire, permit_token = breaker.acquire_call()
        calls.append(acquire)
    limit_call = limiter.acquire_call("track", slot)
    if limit_call is not None:
        calls.append(limit_call)
    try:
        results = run_pipelined(settings, calls)
    except (redis.RedisError, OSError) as exc:
        raise self.retry(countdown=random.uniform(0.5, 2.0), exc=TransientError("batch", "store_unavailable")) \
            from exc
    claimed: list[tuple[dict[str, Any], dict[str, Any], Claim]] = []
    held: list[dict[str, Any]] = []
    for (entry, item), res, (keys, token) in zip(items, results, claim_meta, strict=False):
        c = claims.claim_result(res, keys, token)
        if c.state == "claimed":
            claimed.append((entry, item, c))
        elif c.state == "held":
            held.append(entry)
    permit = breaker.acquire_result(results[len(items)], permit_token) if breaker is not None else None
    answer = Limiter.acquire_result(results[-1]) if limit_call is not None else None
    fallback = Fallback(settings, app)

    def release_all(outcome: str = "ignore") -> None:
        release = [claims.release_call(c) for _e, _i, c in claimed]
        if breaker is not None and permit is not None:
            release.append(breaker.record_call(permit, outcome))  # type: ignore[arg-type]
        if release:
            run_pipelined(settings, release)

    for entry in held:  # another worker is delivering it: look again later
        fallback.park(entry["operation"], entry["task_id"], entry["args"], entry["kwargs"])
    if not claimed:
        release_all()
        return {"delivered": 0, "suppressed": len(items) - len(held), "held": len(held)}
    if permit is not None and not permit.allowed:
        release_all()
        for entry, _item, _c in claimed:
            fallback.park(entry["operation"], entry["task_id"], entry["args"], entry["kwargs"])
        return {"parked": len(claimed)}
    if answer is not None and not answer.granted:
        release_all()
        countdown = answer.wait if answer.reserved else answer.wait + random.uniform(0, min(answer.wait, 1.0))
        raise self.retry(args=[entries], kwargs={"slot": answer.reserved},
                         countdown=min(countdown, settings.max_countdown), exc=TransientError("batch", "rate_limited"))
    if answer is not None and answer.wait > 0:
        time.sleep(answer.wait)

    started = time.monotonic()
    try:
        response = clients_for(settings).track.batch([item for _e, item, _c in claimed])
    except TransientError as exc:
        release_all("ignore" if exc.status == 429 else "failure")
        if exc.status == 429:
            limiter.pause("track", exc.retry_after or 1.0)
        retries = self.request.retries or 0
        if retries >= settings.max_retries:
            _release_singles(app, settings, [e for e, _i, _c in claimed])
            return {"split": len(claimed)}
        countdown = retry_delay(retries, base=settings.retry_backoff_base, cap=settings.retry_backoff_max,
                                retry_after=exc.retry_after, retry_after_max=settings.retry_after_max,
                                max_countdown=settings.max_countdown)
        raise self.retry(countdown=countdown, exc=exc) from None
    except PermanentError:
        # The whole batch was refused: each operation alone gets its own verdict.
        release_all("success")
        _release_singles(app, settings, [e for e, _i, _c in claimed])
        return {"split": len(claimed)}
    duration = time.monotonic() - started
    failed: dict[int, dict[str, Any]] = {}
    if response.status_code == 207:
        try:
            for err in response.json().get("errors", []):
                failed[int(err["batch_index"])] = err
        except (ValueError, KeyError, TypeError, AttributeError):
            failed = {}
    done_calls: list[ScriptCall] = []
    letters = DeadLetters(settings, app)
    for index, (entry, _item, c) in enumerate(claimed):
        err = failed.get(index)
        if err is None:
            done_calls.append(claims.done_call(c, entry["task_id"]))
            continue
        done_calls.append(claims.release_call(c))
        letters.add(operation=entry["operation"], task_id=entry["task_id"],
                    reason=f"batch:{str(err.get('reason') or 'rejected')[:40]}", status=207, attempts=1,
                    args=entry["args"], kwargs=entry["kwargs"])
    if breaker is not None and permit is not None:
        done_calls.append(breaker.record_call(permit, "success", duration))
    answers = run_pipelined(settings, done_calls)
    if breaker is not None and permit is not None:
        breaker.record_result(answers[-1], breaker._effective("success", duration))
    logger.info("cio_celery batch delivered %d operations (%d failed)", len(claimed) - len(failed), len(failed),
                extra={"cio_event": "batch_delivered", "cio_count": len(claimed) - len(failed),
                       "cio_failed": len(failed)})
    return {"delivered": len(claimed) - len(failed), "failed": len(failed)}
