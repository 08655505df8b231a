"""One Celery task per Customer.io operation, each with the SDK method's own signature.

Producer side (:meth:`CioTask.apply_async`, used by ``delay``, signatures and retries):
validate and normalise, mint the event id and idempotency key once, hide arguments
from Flower. Worker side (:meth:`CioTask.deliver`, see delivery.py): decide, then act.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

from celery import Task, shared_task
from celery.utils import uuid

from . import (
    batching,  # noqa: F401 - registers cio_celery.deliver_batch with the operation tasks
    delivery,
)
from .breaker import add_listener as add_breaker_listener
from .coalesce import buffer_at_enqueue
from .exceptions import PermanentError, ValidationError
from .ledger import Ledger, ledger_enabled
from .meta import META_KEY, is_internal_publish
from .operations import EVENT_ID_ARG, EVENT_OPERATIONS
from .settings import Settings, settings_for_app
from .spool import check_options, publisher_for, storable_options
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

def _check_delay(operation: str, options: Mapping[str, Any], settings: Settings) -> None:
    """A caller's countdown or eta may not pass the longest wait the broker tolerates: a Redis
    broker redelivers a message held past its visibility timeout (it runs twice), RabbitMQ
    closes the channel of a consumer that holds one past its consumer_timeout."""
    delay: float | None = None
    if options.get("countdown") is not None:
        delay = float(options["countdown"])
        name = "countdown"
    elif options.get("eta") is not None:
        eta = options["eta"]
        when = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = (when - datetime.now(timezone.utc)).total_seconds()
        name = "eta"
    if delay is not None and delay > settings.max_countdown:
        raise ValidationError(operation, name, f"is {delay:.0f} s away; the longest delay is "
                              f"{settings.max_countdown:.0f} s (below the broker's visibility timeout)")


def _routed_as_usual(task: Any, settings: Settings, routes: Any) -> bool:
    """Whether the app routes ``task`` to the package's own queue for it (no ``task_routes``, or
    routes that agree): only then may a call skip its message (an operation routed elsewhere is
    meant for the workers of that queue). Resolved once per task and routes object."""
    if not routes:
        return True
    cached = getattr(task, "_cio_route_check", None)
    if cached is not None and cached[0] is routes:
        return bool(cached[1])
    try:
        queue = task.app.amqp.router.route({}, task.name, (), {}).get("queue")
        ok = getattr(queue, "name", queue) == settings.queue_for(task.operation)
    except Exception:  # noqa: BLE001 - a router that cannot answer here: publish as usual
        ok = False
    task._cio_route_check = (routes, ok)
    return bool(ok)


def _hidden(n: int, what: str) -> str:
    return f"<{n} {what}{'' if n == 1 else 's'} hidden>"


def validate_idempotency_key(operation: str, key: Any) -> None:
    """A caller's idempotency key: a non-blank string of at most 150 bytes, like an id."""
    if not isinstance(key, str) or not key.strip():
        raise ValidationError(operation, "idempotency_key", "must be a non-blank string")
    if len(key.encode("utf-8", "surrogatepass")) > 150:
        raise ValidationError(operation, "idempotency_key", "is longer than 150 bytes")


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
    typing = False  # normalize() binds arguments with errors that name the field
    # The workers accept json only; a pickled message would be refused and its bytes logged.
    serializer = "json"
    # A dead-lettered operation ends its task failed (Flower shows it) without a traceback.
    throws = (PermanentError,)

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
        if meta is not None and not is_internal_publish():
            # Only the package writes metadata (retries, parks, replays): a caller's would
            # forge attempts, rate-limit slots or another operation's idempotency key.
            raise ValidationError(self.operation, META_KEY, "is reserved for cio_celery's own metadata")
        serializer = options.get("serializer")
        if serializer is not None and serializer != "json":
            raise ValidationError(self.operation, "serializer", "must be json (the workers accept json only)")
        # An option the broker would take and the worker then discard (eta="tomorrow") is lost
        # after the publish: refused here, naming it.
        check_options(self.operation, options)
        if meta is None:
            _check_delay(self.operation, options, settings)
        caller_key = options.pop("idempotency_key", None)
        # Only a plain call may skip its own message (see coalesce.buffer_at_enqueue): one that
        # names a queue, a delay, a producer or callbacks gets the message it asked for.
        plain = not options and producer is None and link is None and link_error is None and shadow is None
        nargs, nkwargs = normalize(self.operation, tuple(args or ()), kw)
        nargs_list = list(nargs)
        new_operation = meta is None
        if meta is None:
            task_id = task_id or uuid()
            if caller_key is not None:
                validate_idempotency_key(self.operation, caller_key)
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
        # Every publish carries its time: the ledger's sweeper compares it with a queue's head.
        meta = {**meta, "at": round(time.time(), 6)}
        nkwargs[META_KEY] = meta
        if not settings.show_args:
            options.setdefault("argsrepr", _hidden(len(nargs_list), "arg"))
            options.setdefault("kwargsrepr", _hidden(len(nkwargs) - 1, "kwarg"))
        routes = self.app.conf.task_routes
        if "queue" not in options and not routes:
            options["queue"] = settings.queue_for(self.operation)
        # A hard limit only: a soft one would raise inside the HTTP call. A killed attempt is
        # requeued (reject_on_worker_lost) and its claim ends with the lease.
        options.setdefault("time_limit", settings.task_time_limit)
        if self.app.conf.task_always_eager:
            return super().apply_async(
                nargs_list, nkwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error, shadow=shadow, **options,
            )
        if not new_operation:
            # Retries, reroutes and replays run in workers: a broker error there is Celery's
            # to handle (the message being processed stays unacked until they succeed).
            self._record(settings, nargs_list, nkwargs, cast(str, task_id), options, meta["at"])
            return super().apply_async(
                nargs_list, nkwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error, shadow=shadow, **options,
            )
        if plain and _routed_as_usual(self, settings, routes) and buffer_at_enqueue(
                settings, self.operation, cast(str, task_id), nargs_list, nkwargs):
            # Past the rate limit: in the batching buffer (store), which the workers drain.
            return self.AsyncResult(task_id)
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
            self._record(self.cio_settings, args, kwargs, task_id, options, kwargs[META_KEY]["at"])
            return Task.apply_async(
                self, args, kwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error, shadow=shadow, **options,
            )

        return publisher_for(self.app, self.cio_settings).publish(
            self, task_id, entry, send, in_caller_thread=producer is not None
        )

    def _record(self, settings: Settings, args: list[Any], kwargs: dict[str, Any], task_id: str,
                options: Mapping[str, Any], at: float) -> None:
        """Record the publish in the delivery ledger (see ledger.py), in the background."""
        if not ledger_enabled(settings, self.app):
            return
        queue = options.get("queue") or options.get("routing_key") or settings.queue_for(self.operation)
        Ledger(settings).record(self.name, task_id, args, kwargs, str(queue), at)

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
        if META_KEY in kw:
            raise ValidationError(self.operation, META_KEY, "is reserved for cio_celery's own metadata")
        normalize(self.operation, tuple(args or ()), kw)
        if "idempotency_key" in options:
            validate_idempotency_key(self.operation, options["idempotency_key"])
        using = options.pop("using", None)
        transaction.on_commit(functools.partial(self.apply_async, args, kwargs, **options), using=using)

    # -- worker side -----------------------------------------------------------------

    def deliver(self, args: Sequence[Any], kwargs: Mapping[str, Any], meta: Any) -> Any:
        """Run one attempt of the operation (see delivery.py): the body of every operation task."""
        return delivery.deliver(self, args, kwargs, meta)


class _CeleryEventListener:
    """Sends each breaker transition as a Celery event from the task that caused it.

    Flower counts custom ``task-*`` events by type in ``flower_events_total``.
    """

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        from celery import current_task

        task = current_task
        if isinstance(task, Task) and str(getattr(task, "name", "")).startswith("cio_celery."):
            delivery.send_event(
                task, f"task-cio-breaker-{new_state.name}", old_state=old_state.name, new_state=new_state.name
            )


add_breaker_listener(_CeleryEventListener())


def _task(operation: str) -> Callable[[Callable[..., Any]], CioTask]:
    """Register ``cio_celery.<operation>`` on every app (shared), typed as a CioTask."""
    decorator = shared_task(bind=True, base=CioTask, name=f"cio_celery.{operation}", operation=operation)
    return cast(Callable[[Callable[..., Any]], CioTask], decorator)


@_task("identify")
def identify(self: CioTask, /, id: Any, *, _cio: dict[str, Any] | None = None, **attrs: Any) -> Any:
    """Create or update a person (``PUT /api/v1/customers/{id}``)."""
    return self.deliver((id,), attrs, _cio)


@_task("track")
def track(
    self: CioTask,
    /,
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
    /,
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
def pageview(self: CioTask, /, customer_id: Any, page: str, *, _cio: dict[str, Any] | None = None, **data: Any) -> Any:
    """Send a page view; it carries an event id minted at enqueue."""
    return self.deliver((customer_id, page), data, _cio)


@_task("backfill")
def backfill(
    self: CioTask, /, customer_id: Any, name: str, timestamp: Any, *, _cio: dict[str, Any] | None = None, **data: Any
) -> Any:
    """Send a past event; it carries an event id minted at enqueue."""
    return self.deliver((customer_id, name, timestamp), data, _cio)


@_task("delete")
def delete(self: CioTask, /, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Delete a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("add_device")
def add_device(
    self: CioTask,
    /,
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
def delete_device(self: CioTask, /, customer_id: Any, device_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Remove a person's device."""
    return self.deliver((customer_id, device_id), {}, _cio)


@_task("suppress")
def suppress(self: CioTask, /, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Suppress a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("unsuppress")
def unsuppress(self: CioTask, /, customer_id: Any, *, _cio: dict[str, Any] | None = None) -> Any:
    """Unsuppress a person."""
    return self.deliver((customer_id,), {}, _cio)


@_task("merge_customers")
def merge_customers(
    self: CioTask,
    /,
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
def batch(self: CioTask, /, operations: list[dict[str, Any]], *, _cio: dict[str, Any] | None = None) -> Any:
    """Send v2 batch operations in one request (``POST /api/v2/batch``)."""
    return self.deliver((operations,), {}, _cio)


def _send_task(operation: str, what: str, request_class: str) -> CioTask:
    """A transactional send task: one ``request`` argument, a dict or the SDK's request object."""

    def run(self: CioTask, /, request: Any, *, _cio: dict[str, Any] | None = None) -> Any:
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
