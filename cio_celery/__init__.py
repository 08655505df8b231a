"""Customer.io operations as Celery tasks that cannot be lost and cannot be double-sent."""

from __future__ import annotations

from .deadletters import DeadLetter, DeadLetters
from .exceptions import (
    CioError,
    CircuitOpenError,
    ConfigurationError,
    DeliveryError,
    EnqueueError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
    ValidationError,
)
from .settings import Settings, build_settings, configure, settings_for_app
from .spool import FlushResult, flush_spool, spool_depth
from .tasks import (
    CioTask,
    add_device,
    backfill,
    batch,
    delete,
    delete_device,
    identify,
    merge_customers,
    pageview,
    send_email,
    send_in_app,
    send_inbox_message,
    send_push,
    send_sms,
    send_whatsapp,
    suppress,
    track,
    track_anonymous,
    unsuppress,
)

__version__ = "0.1.0"

__all__ = [
    "CioError",
    "CioTask",
    "CircuitOpenError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetters",
    "DeliveryError",
    "EnqueueError",
    "FlushResult",
    "PermanentError",
    "Settings",
    "StoreUnavailableError",
    "TransientError",
    "ValidationError",
    "__version__",
    "add_device",
    "backfill",
    "batch",
    "build_settings",
    "configure",
    "delete",
    "delete_device",
    "flush_spool",
    "identify",
    "merge_customers",
    "pageview",
    "send_email",
    "send_in_app",
    "send_inbox_message",
    "send_push",
    "send_sms",
    "send_whatsapp",
    "settings_for_app",
    "spool_depth",
    "suppress",
    "track",
    "track_anonymous",
    "unsuppress",
]


def dead_letters(app: object | None = None) -> DeadLetters:
    """The dead-letter store of ``app`` (default: Celery's current app)."""
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return DeadLetters(settings_for_app(app), app)


__all__ += ["dead_letters"]
