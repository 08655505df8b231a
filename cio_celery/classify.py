"""The one place where an HTTP outcome becomes delivered, transient or permanent."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

import requests

from .exceptions import DeliveryError, PermanentError, TransientError

__all__ = ["TRANSIENT_STATUSES", "classify", "parse_retry_after"]

TRANSIENT_STATUSES = frozenset({408, 429})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def _was_sent(exc: BaseException) -> bool:
    """Whether the request may have reached the server before ``exc`` happened."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if name in {"NewConnectionError", "NameResolutionError", "ConnectTimeoutError"}:
            return False
        for arg in getattr(cur, "args", ()):
            reason = getattr(arg, "reason", None)
            if isinstance(reason, BaseException) and type(reason).__name__ in {
                "NewConnectionError", "NameResolutionError", "ConnectTimeoutError",
            }:
                return False
        cur = cur.__cause__ or cur.__context__
    return True


def classify(
    operation: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
) -> DeliveryError | None:
    """Classify one attempt; ``None`` means delivered.

    2xx is delivered; 408, 429, 5xx, timeouts and connection errors are transient;
    every other status and request error is permanent. The returned error carries
    status, Retry-After and whether the request may have been applied, never the
    payload or URL.
    """
    if exc is not None:
        if isinstance(exc, requests.Timeout):
            sent = _was_sent(exc)
            return TransientError(
                operation, "timeout" if sent else "connect_timeout", maybe_applied=sent
            )
        if isinstance(exc, requests.ConnectionError):
            sent = _was_sent(exc)
            return TransientError(operation, "connection", maybe_applied=sent)
        return PermanentError(operation, f"request_error:{type(exc).__name__}")
    if status is None:
        raise ValueError("classify needs a status or an exception")
    if 200 <= status < 300:
        return None
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        return TransientError(
            operation,
            f"http_{status}",
            status=status,
            retry_after=retry_after,
            maybe_applied=status >= 500,
        )
    return PermanentError(operation, f"http_{status}", status=status, retry_after=retry_after)
