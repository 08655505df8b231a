"""One Celery task per Customer.io operation, each with the SDK method's own signature.

Producer side (:meth:`CioTask.apply_async`, used by ``delay``, signatures and retries):
validate and normalise, mint the event id and idempotency key once, hide arguments
from Flower. Worker side (:meth:`CioTask.deliver`): validate again, call Customer.io
through our client, retry transient failures with jittered backoff, dead-letter
permanent ones.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, cast

import redis
from celery import Task, shared_task
from celery.exceptions import Reject, Retry
from celery.utils import uuid

from . import batching  # noqa: F401 - registers cio_celery.deliver_batch with the operation tasks
from .backoff import retry_delay
from .breaker import Breaker, Outcome, Permit, breaker_for
from .breaker import add_listener as add_breaker_listener
from .client import clients_for
from .deadletters import DeadLetters
from .exceptions import CioError, DeliveryError, PermanentError, TransientError, ValidationError
from .fallback import Fallback
from .idempotency import Claim, Claims
from .limiter import Limiter, Slot, bucket_of
from .operations import EVENT_ID_ARG, EVENT_OPERATIONS, META_KEY, api_of, perform
from .settings import SEND_OPERATIONS, Settings, settings_for_app
from .spool import publisher_for, storable_options
from .store import ScriptCall, key, redis_for, run_scripts
from .ulid import new_ulid
from .validation import normalize

__all__ = [
    "META_KEY",
    "CioTask",
    "add_device",
    "backfill",
    "batch",
    "delete",
    "delete_device",
    "identify",
    "merge_customers",
    "pageview",
    "send_email",
    "send_in_app",
    "send_inbox_message",
    "send_push",
    "send_sms",
    "send_whatsapp",
    "suppress",
    "track",
    "track_anonymous",
    "unsuppress",
]

logger = logging.getLogger("cio_celery")


# 429 answers do not spend the retry budget; after this many times (max_retries + 1) of them
# an operation goes to dead letters all the same.
THROTTLE_BUDGET_FACTOR = 10


def _log(level: int, event: str, task: Task, outcome: str, **extra: Any) -> None:
    # Structured fields only; never ids, emails or attribute values.
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


class CioTask(Task):  # type: ignore[misc]
    """Base class of the operation tasks."""

    operation: str = ""
    ignore_result = True
    # The package counts attempts itself (settings.max_retries) and dead-letters at the end.
    max_retries = None
    acks_late = True
    reject_on_worker_lost = True
    # Celery acknowledges a message whose task hit the hard time limit when these are true
    # (task_acks_on_failure_or_timeout defaults to True): the operation would be lost.
    # False requeues it; the claim's lost-attempt count bounds the loop.
    acks_on_timeout = False
    acks_on_failure_or_timeout = False  # Celery 5.4 reads only this one
    acks_on_failure = True  # a failed task was dead-lettered first
    typing = False  # normalize() binds arguments with errors that name the field

    @property
    def cio_settings(self) -> Settings:
        return settings_for_app(self.app)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Validate, normalise and publish; raises ValidationError and publishes nothing on bad input.

        ``idempotency_key=...`` (an option, not an argument, so it never collides with
        attribute names) sets the operation's idempotency key; by default it is the task id.
        """
        settings = self.cio_settings
        kw = dict(kwargs or {})
        meta = kw.pop(META_KEY, None)
        caller_key = options.pop("idempotency_key", None)
        nargs, nkwargs = normalize(self.operation, tuple(args or ()), kw)
        nargs_list = list(nargs)
        new_operation = meta is None
        if meta is None:
            task_id = task_id or uuid()
            if caller_key is not None and (not isinstance(caller_key, str) or not caller_key.strip()):
                raise ValidationError(self.operation, "idempotency_key", "must be a non-blank string")
            meta = {"key": caller_key or task_id, "enqueued_at": round(time.time(), 3)}
            idx = EVENT_ID_ARG.get(self.operation)
            if idx is not None:
                while len(nargs_list) <= idx:
                    nargs_list.append(None)
                if nargs_list[idx] is None:
                    nargs_list[idx] = new_ulid()
            elif self.operation in EVENT_OPERATIONS:
                meta["event_id"] = new_ulid()
        elif not isinstance(meta, dict) or not isinstance(meta.get("key"), str):
            raise ValidationError(self.operation, META_KEY, "is reserved for cio_celery metadata")
        nkwargs[META_KEY] = meta
        if not settings.show_args:
            options.setdefault("argsrepr", f"<{len(nargs_list)} args hidden>")
            options.setdefault("kwargsrepr", f"<{len(nkwargs) - 1} kwargs hidden>")
        if "queue" not in options and not self.app.conf.task_routes:
            options["queue"] = settings.queue
        # A hard limit only: a soft one would raise inside the HTTP call. A killed attempt is
        # requeued (reject_on_worker_lost) and its claim ends with the lease.
        options.setdefault("time_limit", settings.task_time_limit)
        if not new_operation or self.app.conf.task_always_eager:
            # Retries, reroutes and replays run in workers: a broker error there is Celery's
            # to handle (the message being processed stays unacked until they succeed).
            return super().apply_async(
                nargs_list, nkwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error, shadow=shadow, **options,
            )
        return self._publish_bounded(
            nargs_list, nkwargs, cast(str, task_id), producer, link, link_error, shadow, options
        )

    def _publish_bounded(
        self,
        args: list[Any],
        kwargs: dict[str, Any],
        task_id: str,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: str | None,
        options: dict[str, Any],
    ) -> Any:
        """Publish within ``enqueue_timeout``; spool what the broker cannot take (see spool.py)."""
        # Celery finds the parent task through a thread-local stack; the publish runs on
        # another thread, so the caller's parent and root ids are resolved here.
        parent = self.app.current_worker_task
        if parent is not None and parent.request.id:
            options.setdefault("root_id", parent.request.root_id or parent.request.id)
            options.setdefault("parent_id", parent.request.id)
        options.setdefault("ignore_result", self.ignore_result)
        called_at = time.time()

        def entry() -> dict[str, Any]:
            stored = storable_options({**options, "link": link, "link_error": link_error, "shadow": shadow}, called_at)
            return {"task": self.name, "args": args, "kwargs": kwargs, "task_id": task_id, "options": stored}

        def send() -> Any:
            return Task.apply_async(
                self, args, kwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error, shadow=shadow, **options,
            )

        return publisher_for(self.app, self.cio_settings).publish(
            self, task_id, entry, send, in_caller_thread=producer is not None
        )

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Like ``delay``, but publish only when the current Django transaction commits.

        The arguments are validated now, so bad input raises in the caller even inside a
        transaction; nothing is published if the transaction rolls back. Outside a
        transaction (autocommit) the operation is published at once. Same signature as
        Celery's own ``DjangoTask.delay_on_commit``.
        """
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> None:
        """``apply_async`` run by ``transaction.on_commit`` (``using=`` picks the database)."""
        from django.db import transaction  # Django is an optional dependency

        kw = dict(kwargs or {})
        if META_KEY not in kw:
            normalize(self.operation, tuple(args or ()), kw)
        using = options.pop("using", None)
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, **options), using=using)

    # -- worker side -----------------------------------------------------------------

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.cio_settings, self.app)

    def _dead_letter(
        self, reason: str, status: int | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        attempts = (self.request.retries or 0) + 1
        try:
            self.dead_letters().add(
                operation=self.operation,
                task_id=self.request.id,
                reason=reason,
                status=status,
                attempts=attempts,
                args=list(args),
                kwargs=dict(kwargs),
            )
        except Exception as exc:  # noqa: BLE001 - see the comment below
            # The store is unreachable: hand the message back to the broker rather than
            # drop it (acks_late + Reject(requeue) keeps it).
            _log(logging.ERROR, "dead_letter_failed", self, "requeued", error=type(exc).__name__)
            raise Reject(f"dead-letter store unavailable ({type(exc).__name__})", requeue=True) from None
        _log(logging.ERROR, "dead_lettered", self, "dead_letter", reason=reason, status=status)
        self._send_event("task-cio-dead-lettered", reason=reason, status=status)

    def _missing_credentials(self, settings: Settings) -> str | None:
        if api_of(self.operation) == "app":
            return None if settings.app_api_key else "CIO_APP_API_KEY"
        if not settings.site_id:
            return "CIO_SITE_ID"
        return None if settings.track_api_key else "CIO_TRACK_API_KEY"

    def deliver(self, args: Sequence[Any], kwargs: Mapping[str, Any], meta: Mapping[str, Any] | None) -> Any:
        """Run one attempt of the operation; the body of every operation task."""
        settings = self.cio_settings
        op = self.operation
        meta_d = dict(meta or {})
        replay_kwargs = dict(kwargs)
        if meta is not None:
            replay_kwargs[META_KEY] = meta_d
        try:
            nargs, nkwargs = normalize(op, tuple(args), dict(kwargs))
        except ValidationError as exc:
            # A message from an older or foreign producer: retrying cannot fix it.
            self._dead_letter(f"invalid:{exc.field}", None, args, replay_kwargs)
            raise PermanentError(op, "invalid_input", detail=str(exc)) from None
        missing = self._missing_credentials(settings)
        if missing is not None:
            self._dead_letter("not_configured", None, nargs, replay_kwargs)
            raise PermanentError(op, "not_configured", detail=f"{missing} is not set") from None
        event_id = meta_d.get("event_id")
        retries = self._effective_retries(meta_d)
        claims = Claims(settings) if settings.idempotency_enabled else None
        breaker = breaker_for(settings) if settings.breaker_enabled else None
        limiter = Limiter(settings)
        held_slot = int(meta_d.pop("slot", 0) or 0)  # a rate-limit slot reserved on an earlier visit
        claim: Claim | None = None
        permit: Permit | None = None
        slot: Slot | None = None
        try:
            claim, permit, slot = self._enter(claims, breaker, limiter, str(meta_d.get("key") or self.request.id),
                                              held_slot)
        except (redis.RedisError, OSError) as store_exc:
            if settings.breaker_on_store_error != "allow":
                # Never call Customer.io unguarded: try later, without spending an attempt.
                _log(logging.WARNING, "store_unavailable", self, "retry", error=type(store_exc).__name__)
                self._free_retry(self._countdown(settings, retries, None), TransientError(op, "store_unavailable"),
                                 nargs, replay_kwargs, meta_d)
            # breaker_on_store_error == "allow": call Customer.io unguarded (no claim, no permit).
        if claim is not None and not claim.owned:
            self._leave(claims, breaker, None, permit, "ignore")  # hands back a probe permit, if any
            if claim.state == "done":
                _log(logging.INFO, "duplicate_suppressed", self, "suppressed")
                self._send_event("task-cio-duplicate-suppressed")
                return {"duplicate": True}
            # Another worker holds the claim: look again, never drop. A live holder is done
            # within one HTTP timeout; a dead one's lease ends within held_for.
            countdown = min(min(claim.held_for, settings.timeout) + random.uniform(0.0, 1.0), settings.max_countdown)
            _log(logging.INFO, "claim_held", self, "retry", countdown=round(countdown, 3))
            self._free_retry(countdown, TransientError(op, "claimed_elsewhere"), nargs, replay_kwargs, meta_d)
        if permit is not None and not permit.allowed:
            self._leave(claims, None, claim, None, "ignore")
            return self._park(settings, nargs, replay_kwargs, meta_d, retries, permit)
        if claim is not None and claim.lost_attempts > settings.max_retries:
            # Killed mid-call again and again (out of memory, a hang past the hard time limit).
            self._leave(claims, breaker, claim, permit, "ignore")
            self._dead_letter("worker_lost_repeatedly", None, nargs, replay_kwargs)
            raise PermanentError(op, "worker_lost_repeatedly")
        if claim is not None and claim.recovered and self._review_ambiguous(settings):
            # The previous attempt's worker died mid-call: the send may have gone out.
            self._leave(claims, breaker, claim, permit, "ignore")
            self._dead_letter("ambiguous:worker_lost", None, nargs, replay_kwargs)
            raise PermanentError(op, "ambiguous:worker_lost")
        if slot is not None and not slot.granted:
            # Over the cluster's rate (or paused by a 429): come back when the slot reserved
            # for this task comes, without spending an attempt or holding this worker process.
            self._leave(claims, breaker, claim, permit, "ignore")
            if slot.reserved:
                meta_d["slot"] = slot.reserved
                countdown = min(slot.wait, settings.max_countdown)
            else:  # beyond the horizon: nothing reserved, look again later
                countdown = min(slot.wait + random.uniform(0.0, min(slot.wait, 1.0)), settings.max_countdown)
            _log(logging.INFO, "rate_limited", self, "retry", countdown=round(countdown, 3))
            self._free_retry(countdown, TransientError(op, "rate_limited"), nargs, replay_kwargs, meta_d)
        if slot is not None and slot.wait > 0 and (permit is None or permit.decision == "allow"):
            # A reserved slot a few milliseconds away. A half-open probe does not wait: the
            # K probes must answer together, before the first failure reopens the breaker.
            time.sleep(slot.wait)
            if breaker is not None and permit is not None:
                # The breaker may have tripped while this worker slept: ask again.
                permit = breaker.acquire()
                if not permit.allowed:
                    self._leave(claims, None, claim, None, "ignore")
                    return self._park(settings, nargs, replay_kwargs, meta_d, retries, permit)
        started = time.monotonic()
        try:
            result = perform(clients_for(settings), op, list(nargs), nkwargs, event_id)
        except TransientError as exc:
            exc.for_operation(op)
            # A 429 says "slow down", not "down": it must not trip the breaker.
            self._leave(claims, breaker, claim, permit, "ignore" if exc.status == 429 else "failure",
                        pause=(exc.retry_after or 1.0) if exc.status == 429 else None)
            if exc.maybe_applied and self._review_ambiguous(settings):
                self._dead_letter(f"ambiguous:{exc.reason}", exc.status, nargs, replay_kwargs)
                raise
            if exc.status == 429:
                # Throttled, not failed: wait as told without spending the retry budget
                # (bounded all the same, so a throttle that never ends still ends in review).
                throttled = int(meta_d.get("throttled", 0)) + 1
                if throttled > THROTTLE_BUDGET_FACTOR * (settings.max_retries + 1):
                    self._dead_letter("retries_exhausted:http_429", 429, nargs, replay_kwargs)
                    raise
                meta_d["throttled"] = throttled
                countdown = self._countdown(settings, throttled - 1, exc.retry_after)
                _log(logging.WARNING, "retry", self, "retry", reason=exc.reason, countdown=round(countdown, 3),
                     free=True)
                self._free_retry(countdown, exc, nargs, replay_kwargs, meta_d)
            if retries >= settings.max_retries:
                self._dead_letter(f"retries_exhausted:{exc.reason}", exc.status, nargs, replay_kwargs)
                raise
            countdown = self._countdown(settings, retries, exc.retry_after)
            _log(logging.WARNING, "retry", self, "retry", reason=exc.reason, countdown=round(countdown, 3))
            self._retry(countdown, exc, nargs, replay_kwargs)
        except PermanentError as exc:
            exc.for_operation(op)
            # Customer.io answered: the service is up, whatever it thought of the input.
            self._leave(claims, breaker, claim, permit, "success")
            self._dead_letter(exc.reason, exc.status, nargs, replay_kwargs)
            raise
        except CioError:
            self._leave(claims, breaker, claim, permit, "ignore")
            raise
        except Exception as exc:  # noqa: BLE001 - see the comment below
            self._leave(claims, breaker, claim, permit, "ignore")
            # A bug or an unexpected library error: its text may hold payload, so only
            # its type goes on, and the operation is kept for replay.
            reason = f"internal:{type(exc).__name__}"
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else None
            _log(logging.ERROR, "internal_error", self, "dead_letter", error=type(exc).__name__, where=where)
            self._dead_letter(reason, None, nargs, replay_kwargs)
            raise PermanentError(op, reason) from None
        self._leave(claims, breaker, claim, permit, "success", time.monotonic() - started, delivered=True)
        _log(logging.INFO, "delivered", self, "delivered")
        return {"delivered": True, "attempts": retries + 1, **result}

    def _review_ambiguous(self, settings: Settings) -> bool:
        """A transactional send (no idempotency at Customer.io) set to go to review when it may have gone out."""
        return self.operation in SEND_OPERATIONS and settings.ambiguous_policy(self.operation) == "dead_letter"

    def _enter(
        self,
        claims: Claims | None,
        breaker: Breaker | None,
        limiter: Limiter | None,
        idempotency_key: str,
        held_slot: int = 0,
    ) -> tuple[Claim | None, Permit | None, Slot | None]:
        """Claim the key, ask the breaker and the rate limiter, in one round trip to Redis."""
        calls: list[ScriptCall] = []
        if claims is not None:
            claim_call, claim_keys, claim_token = claims.claim_call(self.operation, idempotency_key)
            calls.append(claim_call)
        if breaker is not None:
            acquire_call, permit_token = breaker.acquire_call()
            calls.append(acquire_call)
        limit_call = limiter.acquire_call(bucket_of(self.operation), held_slot) if limiter is not None else None
        if limit_call is not None:
            calls.append(limit_call)
        if not calls:
            return None, None, None
        results = run_scripts(self.cio_settings, calls)
        claim = claims.claim_result(results[0], claim_keys, claim_token) if claims is not None else None
        permit = breaker.acquire_result(results[1 if claims is not None else 0], permit_token) \
            if breaker is not None else None
        slot = Limiter.acquire_result(results[-1]) if limit_call is not None else None
        return claim, permit, slot

    def _leave(
        self,
        claims: Claims | None,
        breaker: Breaker | None,
        claim: Claim | None,
        permit: Permit | None,
        outcome: Outcome,
        duration: float | None = None,
        delivered: bool = False,
        pause: float | None = None,
    ) -> None:
        """Report the outcome to the breaker and mark done (or release) the claim, in one round
        trip; ``pause`` (a 429's Retry-After) pauses the rate limiter for every worker."""
        calls: list[ScriptCall] = []
        if breaker is not None and permit is not None:
            calls.append(breaker.record_call(permit, outcome, duration))
        if claims is not None and claim is not None and claim.owned:
            calls.append(claims.done_call(claim, self.request.id or "") if delivered else claims.release_call(claim))
        if pause is not None:
            limiter, bucket = Limiter(self.cio_settings), bucket_of(self.operation)
            if limiter.rate_of(bucket) > 0:
                calls.append(limiter.pause_call(bucket, pause))
        if not calls:
            return
        try:
            results = run_scripts(self.cio_settings, calls)
        except (redis.RedisError, OSError) as exc:
            # The delivery stands; the breaker loses one outcome, and an unreleased claim ends
            # with its lease (a done mark lost here lets a redelivery through: it is logged).
            _log(logging.WARNING, "store_update_failed", self, "ignored", error=type(exc).__name__,
                 delivered=delivered)
            return
        if breaker is not None and permit is not None:
            breaker.record_result(results[0], breaker._effective(outcome, duration))

    def _free_retry(
        self,
        countdown: float,
        exc: DeliveryError,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
    ) -> NoReturn:
        """Retry without spending an attempt (the store was down, another worker held the claim,
        or the rate limiter said wait)."""
        meta["free"] = int(meta.get("free", 0)) + 1
        kwargs[META_KEY] = meta
        self._retry(countdown, exc, args, kwargs)

    def _effective_retries(self, meta: Mapping[str, Any]) -> int:
        """Attempts spent so far: before parking, plus this message's retries, minus free ones."""
        before = int(meta.get("attempts_before", 0))
        free = int(meta.get("free", 0))
        return max(0, before + (self.request.retries or 0) - free)

    @staticmethod
    def _countdown(settings: Settings, retries: int, retry_after: float | None) -> float:
        return retry_delay(
            retries,
            base=settings.retry_backoff_base,
            cap=settings.retry_backoff_max,
            retry_after=retry_after,
            retry_after_max=settings.retry_after_max,
            max_countdown=settings.max_countdown,
        )

    def _park(
        self,
        settings: Settings,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        meta: dict[str, Any],
        retries: int,
        permit: Permit,
    ) -> dict[str, Any]:
        """Reroute to the fallback store: no call, no attempt spent, no ETA held in memory."""
        meta = {**meta, "attempts_before": retries, "free": 0}
        kwargs = {**kwargs, META_KEY: meta}
        try:
            depth = Fallback(settings, self.app).park(self.operation, self.request.id, list(args), kwargs)
        except (redis.RedisError, OSError) as exc:
            _log(logging.ERROR, "park_failed", self, "requeued", error=type(exc).__name__)
            raise Reject("fallback store unavailable", requeue=True) from None
        _log(logging.INFO, "parked", self, "parked", depth=depth,
             breaker_retry_after=round(permit.retry_after, 3))
        self._send_event("task-cio-rerouted", depth=depth)
        return {"parked": True}

    def _send_event(self, type_: str, **fields: Any) -> None:
        if not self.app.conf.worker_send_task_events:
            return
        try:
            self.send_event(type_, **fields)
        except Exception:  # noqa: BLE001, S110 - monitoring must never break a delivery
            pass

    def _retry(
        self, countdown: float, exc: DeliveryError, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> NoReturn:
        self._count_retry(exc.reason)
        try:
            raise self.retry(args=list(args), kwargs=dict(kwargs), countdown=countdown, exc=exc)
        except Retry:
            raise
        except Exception as publish_exc:  # noqa: BLE001 - anything but Retry means not published
            # Celery rejects and loses a message whose retry could not be published.
            _log(logging.ERROR, "retry_publish_failed", self, "requeued", error=type(publish_exc).__name__)
            raise Reject("retry could not be published", requeue=True) from None

    def _count_retry(self, reason: str) -> None:
        """Count the retry by reason in ``{prefix}:stats`` (Prometheus reads it); best effort."""
        try:
            redis_for(self.cio_settings).hincrby(key(self.cio_settings, "stats"), f"retry:{reason}", 1)
        except Exception:  # noqa: BLE001, S110 - a metric must never stop a retry
            pass


class _CeleryEventListener:
    """Sends each breaker transition as a Celery event from the task that caused it.

    Flower counts custom ``task-*`` events by type in ``flower_events_total``.
    """

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        from celery import current_task

        task = current_task
        if isinstance(task, CioTask):
            task._send_event(
                f"task-cio-breaker-{new_state.name}", old_state=old_state.name, new_state=new_state.name
            )


add_breaker_listener(_CeleryEventListener())


def _task(operation: str) -> Callable[[Callable[..., Any]], CioTask]:
    """Register ``cio_celery.<operation>`` on every app (shared), typed as a CioTask."""
    decorator = shared_task(bind=True, base=CioTask, name=f"cio_celery.{operation}", operation=operation)
    return cast(Callable[[Callable[..., Any]], CioTask], decorator)


@_task("identify")
def identify(self: CioTask, id: Any, *, _cio: dict[str, Any] | None = None, **attrs: Any) -> Any:
    """Create or update a person (``PUT /api/v1/customers/{id}``)."""
    return self.deliver((id,), attrs, _cio)


@_task("track")
def track(
    self: CioTask,
    customer_id: Any,
    name: str,
    data: dict[str, Any] | None = None,
    id: str | None = None,
    timestamp: Any = None,
    *,
    _cio: dict[str, Any] | None = None,
) -> Any:
    """Send an event for a person; ``id`` (a ULID) is minted at enqueue when not given."""
    return self.deliver((customer_id, name, data, id, timestamp), {}, _cio)


@_task("track_anonymous")
def track_anonymous(
    self: CioTask,
    anonymous_id: Any,
    name: str,
    data: dict[str, Any] | None = None,
    id: str | None = None,
    timestamp: Any = None,
    *,
    _cio: dict[str, Any] | None = None,
) -> Any:
    """Send an anonymous event; ``id`` (a ULID) is minted at enqueue when not given."""
    return self.deliver((anonymous_id, name, data, id, timestamp), {}, _cio)


@_task("pageview")
def pageview(self: CioTask, customer_id: Any, page: str, *, _cio: dict[str, Any] | None = None, **data: Any) -> Any:
    """Send a page view; it carries an event id minted at enqueue."""
    return self.deliver((customer_id, page), data, _cio)


@_task("backfill")
def backfill(
    self: CioTask, customer_id: Any, name: str, timestamp: Any, *, _cio: dict[str, Any] | None = None, **data: Any
) -> Any:
    """Send a past event; it carries an event id minted at enqueue."""
    return self.deliver((customer_id, name, timestamp), data, _cio)


@_task("delete")
def delete(self: CioTask, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Delete a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("add_device")
def add_device(
    self: CioTask,
    customer_id: Any,
    device_id: Any,
    platform: str,
    *,
    _cio: dict[str, Any] | None = None,
    **data: Any,
) -> Any:
    """Add or update a person's device."""
    return self.deliver((customer_id, device_id, platform), data, _cio)


@_task("delete_device")
def delete_device(self: CioTask, customer_id: Any, device_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Remove a person's device."""
    return self.deliver((customer_id, device_id), {}, _cio)


@_task("suppress")
def suppress(self: CioTask, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Suppress a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("unsuppress")
def unsuppress(self: CioTask, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Unsuppress a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("merge_customers")
def merge_customers(
    self: CioTask,
    primary_id_type: str,
    primary_id: Any,
    secondary_id_type: str,
    secondary_id: Any,
    *,
    _cio: dict[str, Any] | None = None,
) -> Any:
    """Merge the secondary person into the primary one (id types: id, email, cio_id)."""
    return self.deliver((primary_id_type, primary_id, secondary_id_type, secondary_id), {}, _cio)


@_task("batch")
def batch(self: CioTask, operations: list[dict[str, Any]], *, _cio: dict[str, Any] | None = None) -> Any:
    """Send v2 batch operations in one request (``POST /api/v2/batch``)."""
    return self.deliver((operations,), {}, _cio)


def _send_task(operation: str, what: str, request_class: str) -> CioTask:
    """A transactional send task: one ``request`` argument, a dict or the SDK's request object."""

    def run(self: CioTask, request: Any, *, _cio: dict[str, Any] | None = None) -> Any:
        return self.deliver((request,), {}, _cio)

    run.__name__ = run.__qualname__ = operation
    run.__doc__ = f"Send a transactional {what} (a dict or ``customerio.{request_class}``)."
    return _task(operation)(run)


send_email = _send_task("send_email", "email", "SendEmailRequest")
send_push = _send_task("send_push", "push", "SendPushRequest")
send_sms = _send_task("send_sms", "SMS", "SendSMSRequest")
send_whatsapp = _send_task("send_whatsapp", "WhatsApp message", "SendWhatsAppRequest")
send_inbox_message = _send_task("send_inbox_message", "inbox message", "SendInboxMessageRequest")
send_in_app = _send_task("send_in_app", "in-app message", "SendInAppRequest")


from . import worker as _worker  # noqa: E402,F401  (connects the worker signals)
