"""Worker-side wiring: check the configuration and start the fallback releaser and the batching
drainer when a worker is ready, stop them on shutdown."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from .breaker import breaker_for
from .checks import check_worker
from .coalesce import Coalescer, coalescing
from .fallback import Fallback, Releaser
from .guard import pending_marks
from .limiter import Limiter
from .settings import settings_for_app

__all__ = ["releaser_of"]

logger = logging.getLogger("cio_celery.worker")

_RELEASERS: dict[int, Releaser] = {}
_COALESCERS: dict[int, Coalescer] = {}


def releaser_of(app: Any) -> Releaser | None:
    """The running releaser of ``app`` in this process, if any."""
    return _RELEASERS.get(id(app))


def _start_releaser(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or id(app) in _RELEASERS:
        return
    try:
        settings = settings_for_app(app)
        if not settings.redis_url:
            logger.warning("cio_celery: no store configured (CIO_REDIS_URL); fallback releaser not started")
            return
        breaker = breaker_for(settings) if settings.breaker_enabled else None
        releaser = Releaser(Fallback(settings, app), breaker)
        releaser.start()
        _RELEASERS[id(app)] = releaser
        if coalescing(settings, Limiter(settings)):
            coalescer = Coalescer(settings, app)
            coalescer.start()
            _COALESCERS[id(app)] = coalescer
    except Exception as exc:  # noqa: BLE001 - never prevent a worker from starting
        logger.error("cio_celery: fallback releaser not started: %s", exc)


def _stop_releaser(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    releaser = _RELEASERS.pop(id(app), None) if app is not None else None
    if releaser is not None:
        releaser.stop()
    coalescer = _COALESCERS.pop(id(app), None) if app is not None else None
    if coalescer is not None:
        coalescer.stop()


def _carry_events_flag(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    """``celery worker -E`` turns task events on without setting ``worker_send_task_events``,
    which is what CioTask._send_event reads (in the pool processes too): set it, before the
    pool starts, so the package's custom events follow the flag."""
    if conf is not None and getattr(instance, "task_events", False):
        conf.worker_send_task_events = True


def _last_marks(**_: Any) -> None:
    """A pool process (or a solo worker) ends: write the done marks still waiting for the store."""
    try:
        pending_marks().give_up_now()
    except Exception as exc:  # noqa: BLE001 - shutting down: never raise here
        logger.error("cio_celery: pending done marks not written at shutdown: %s", type(exc).__name__)


signals.worker_process_shutdown.connect(_last_marks, weak=False)
signals.worker_shutdown.connect(_last_marks, weak=False)
signals.celeryd_after_setup.connect(_carry_events_flag, weak=False)
signals.worker_ready.connect(check_worker, weak=False)
signals.worker_ready.connect(_start_releaser, weak=False)
signals.worker_shutdown.connect(_stop_releaser, weak=False)
