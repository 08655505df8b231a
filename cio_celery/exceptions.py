"""The package's one exception tree.

Every message here is built from the operation name, field names, limits and HTTP
status only: never from a payload, a URL query, an id or a credential, because these
exceptions end up in worker logs, result backends and Flower.
"""

from __future__ import annotations

import pybreaker

__all__ = [
    "CioError",
    "CircuitOpenError",
    "ConfigurationError",
    "DeliveryError",
    "EnqueueError",
    "PermanentError",
    "StoreStateError",
    "StoreUnavailableError",
    "TransientError",
    "ValidationError",
]


class CioError(Exception):
    """Base of every error raised by cio_celery."""


class ConfigurationError(CioError):
    """A setting is missing or invalid; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"cio_celery setting {setting}: {problem}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.setting, self.problem))


class ValidationError(CioError, ValueError):
    """An operation's input breaks a Customer.io limit; raised before anything is published."""

    def __init__(self, operation: str, field: str, problem: str) -> None:
        self.operation = operation
        self.field = field
        self.problem = problem
        super().__init__(f"{operation}: {field} {problem}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.operation, self.field, self.problem))


class DeliveryError(CioError):
    """Customer.io did not accept an operation.

    ``status`` is the HTTP status (``None`` for timeouts and connection errors),
    ``retry_after`` the server's Retry-After in seconds when it sent one, ``reason`` a
    short machine-readable word (``http_503``, ``timeout``, ``connection`` ...), and
    ``maybe_applied`` tells whether the request may have reached Customer.io.
    """

    def __init__(
        self,
        operation: str,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
        maybe_applied: bool = False,
        detail: str = "",
    ) -> None:
        self.operation = operation
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied
        self.detail = detail
        super().__init__(operation, reason)

    def for_operation(self, operation: str) -> DeliveryError:
        """Name the operation (the client raises before it knows which one it served)."""
        self.operation = operation
        self.args = (operation, self.reason)
        return self

    def __str__(self) -> str:
        text = f"{self.operation}: {self.reason}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g}s)"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            type(self),
            (self.operation, self.reason, self.status, self.retry_after, self.maybe_applied, self.detail),
        )


class TransientError(DeliveryError):
    """A failure worth retrying: 408, 429, 5xx, timeout, connection error."""


class PermanentError(DeliveryError):
    """A failure that retrying cannot fix: any other 4xx, or input refused by the worker."""


class EnqueueError(CioError):
    """An operation could not be handed to the broker (and, with ``on_broker_error=spool``, not
    to the local spool either). ``spooled`` says whether it is safe in the spool anyway."""

    def __init__(self, operation: str, reason: str, spooled: bool = False) -> None:
        self.operation = operation
        self.reason = reason
        self.spooled = spooled
        super().__init__(f"cio_celery {operation}: could not enqueue ({reason})")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.operation, self.reason, self.spooled))


class StoreUnavailableError(CioError):
    """The Redis store (breaker, idempotency, fallback, dead letters) could not be reached."""


class StoreStateError(CioError):
    """The store answered something that cannot be read (corrupt or foreign state)."""


class CircuitOpenError(CioError, pybreaker.CircuitBreakerError):
    """The cluster-wide breaker refused the call; ``retry_after`` is the time left open."""

    def __init__(self, breaker: str, retry_after: float | None = None) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        text = f"circuit breaker {breaker!r} is open"
        if retry_after is not None:
            text += f" ({retry_after:.1f}s left)"
        super().__init__(text)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.breaker, self.retry_after))
