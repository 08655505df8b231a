"""Small polling helpers for tests that wait on other threads or processes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def applied_by_seq(fake: Any, operation: str = "track") -> Counter[int]:
    """How many times the fake applied each ``seq`` of a track (alone or as a v2 batch item) or,
    with ``operation="send_email"``, of a send."""
    out: Counter[int] = Counter()
    for a in fake.applied:
        body = a.json or {}
        if a.operation == "track":
            seq = (body.get("data") or {}).get("seq")
        elif a.operation == "batch:event":
            seq = (body.get("attributes") or {}).get("seq")
        elif a.operation == operation == "send_email":
            seq = (body.get("message_data") or {}).get("seq")
        else:
            continue
        if seq is not None:
            out[int(seq)] += 1
    return out
