"""An operation's metadata (the reserved ``_cio`` keyword), parsed and checked once.

The metadata travels with the operation through retries, parks, batch drains and
dead-letter replays: the idempotency key, the event id, and the counters that decide when
an operation has had enough attempts. Callers never write it (see :func:`internal_publish`);
a worker reads it with :meth:`Meta.parse`, which never raises: a counter that cannot be read
is taken as 0 and reported in ``Meta.problems``, so a damaged message is still delivered or
dead-lettered, never lost.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["META_KEY", "Meta", "internal_publish", "is_internal_publish"]

# Reserved keyword carrying the metadata. It never collides with SDK parameters.
META_KEY = "_cio"

# Longest idempotency key or event id accepted in metadata (a caller key is at most 150 bytes;
# a task id is 36 characters).
_MAX_TEXT = 256

_COUNTERS = ("attempts_before", "free", "throttled", "store_errors", "store_waits", "alone")

_internal: contextvars.ContextVar[bool] = contextvars.ContextVar("cio_internal_publish", default=False)


@contextmanager
def internal_publish() -> Iterator[None]:
    """Publishes made inside carry metadata written by the package (retries, parks, replays).

    Outside it, ``apply_async`` refuses a ``_cio`` keyword: a caller cannot forge attempts,
    rate-limit slots or another operation's idempotency key.
    """
    token = _internal.set(True)
    try:
        yield
    finally:
        _internal.reset(token)


def is_internal_publish() -> bool:
    return _internal.get()


@dataclass(frozen=True)
class Meta:
    """The checked metadata of one operation."""

    key: str
    enqueued_at: float | None = None
    event_id: str | None = None
    attempts_before: int = 0  # attempts spent before the operation was parked
    free: int = 0  # retries of this message that spent no attempt
    throttled: int = 0  # 429 answers so far
    store_errors: int = 0  # store script errors so far (bounded, then dead letter)
    store_waits: int = 0  # retries because the store could not be reached (sets their backoff)
    alone: int = 0  # 1: taken out of a batch to go alone; never coalesced into one again
    slot: int = 0  # a rate-limit slot reserved on an earlier visit (unix µs)
    dead_reason: str | None = None  # decided for dead letters, waiting for room there
    dead_status: int = 0
    published_at: float | None = field(default=None, compare=False)  # this message's publish time
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, raw: Any, task_id: str) -> Meta:
        """Read ``raw`` (the ``_cio`` value of a message); never raises.

        A missing or unreadable key falls back to the task id (the default key), a counter
        that is not a non-negative integer to 0; each such repair is named in ``problems``.
        """
        problems: list[str] = []
        if raw is None:
            return cls(key=task_id)
        if not isinstance(raw, Mapping):
            return cls(key=task_id, problems=("_cio",))
        key = raw.get("key")
        if not _is_text(key):
            if key is not None:
                problems.append("_cio.key")
            key = task_id
        event_id = raw.get("event_id")
        if event_id is not None and not _is_text(event_id):
            problems.append("_cio.event_id")
            event_id = None
        counters: dict[str, int] = {}
        for name in _COUNTERS:
            value, ok = _count(raw.get(name, 0))
            counters[name] = value
            if not ok:
                problems.append(f"_cio.{name}")
        slot, ok = _count(raw.get("slot", 0))
        if not ok:
            problems.append("_cio.slot")
        enqueued_at, at = _time(raw.get("enqueued_at")), _time(raw.get("at"))
        dead_reason = raw.get("dead_reason")
        if dead_reason is not None and not (_is_text(dead_reason) and len(dead_reason) <= 64):
            problems.append("_cio.dead_reason")
            dead_reason = None
        dead_status, _ok = _count(raw.get("dead_status", 0))
        return cls(key=str(key), enqueued_at=enqueued_at, event_id=event_id, slot=slot, published_at=at,
                   dead_reason=dead_reason, dead_status=dead_status, problems=tuple(problems), **counters)

    def as_dict(self) -> dict[str, Any]:
        """The form carried in a message (counters at 0 are left out)."""
        out: dict[str, Any] = {"key": self.key}
        if self.enqueued_at is not None:
            out["enqueued_at"] = self.enqueued_at
        if self.event_id is not None:
            out["event_id"] = self.event_id
        for name in (*_COUNTERS, "slot", "dead_reason", "dead_status"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out

    def spent(self, retries: int) -> int:
        """Attempts spent so far: before parking, plus this message's retries, minus free ones."""
        return max(0, self.attempts_before + retries - self.free)

    def changed(self, **changes: Any) -> Meta:
        return replace(self, **changes)


def _time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_TEXT


def _count(value: Any) -> tuple[int, bool]:
    """A non-negative int from ``value``; (0, False) when it is not one."""
    if isinstance(value, bool):
        return 0, False
    if isinstance(value, int):
        return (value, True) if value >= 0 else (0, False)
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value == int(value):
        return int(value), True
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value), True
    return 0, False
