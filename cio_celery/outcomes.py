"""The outcome of one delivery attempt: a value that the executor turns into one action.

A delivery decides first and acts second. Deciding may talk to the store and to Customer.io;
it ends in exactly one of these values. The executor (``CioTask._act`` for one operation,
``batching._act`` for a batch) then performs exactly one action for it, with one log line and
one event: return (the message is acknowledged), publish a retry, park in the fallback store,
write a dead letter, or hand the message back to the broker. An action that fails becomes a
:class:`Requeue`, never an acknowledgement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .meta import Meta

__all__ = ["Coalesced", "DeadLetter", "Delivered", "Outcome", "Park", "Requeue", "Retry", "Suppressed"]


@dataclass(frozen=True)
class Delivered:
    """Customer.io accepted the operation; ``facts`` holds non-personal facts of the answer."""

    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suppressed:
    """The operation's idempotency key is marked done: a duplicate, skipped."""


@dataclass(frozen=True)
class Retry:
    """Publish the operation again after ``countdown`` s, carrying ``meta``.

    ``free`` retries spend no attempt (the store was down, another worker held the claim, the
    rate limiter said wait, a 429).
    """

    countdown: float
    reason: str
    free: bool
    meta: Meta
    status: int | None = None


@dataclass(frozen=True)
class Park:
    """The breaker refuses calls: keep the operation in the fallback store until it allows."""

    retry_after: float


@dataclass(frozen=True)
class DeadLetter:
    """Keep the operation, with its reason, for a human.

    ``in_doubt``: the call may have been applied, so the claim is given back only once the dead
    letter is written (if it cannot be written, the next attempt sees an unfinished attempt).
    """

    reason: str
    status: int | None = None
    in_doubt: bool = False


@dataclass(frozen=True)
class Coalesced:
    """The admission put the operation in the batching buffer (in the same script): it leaves
    in a ``/api/v2/batch`` request (see coalesce.py)."""


@dataclass(frozen=True)
class Requeue:
    """Hand the message back to the broker unacknowledged (an action could not be performed)."""

    why: str


Outcome = Delivered | Suppressed | Retry | Park | Coalesced | DeadLetter | Requeue
