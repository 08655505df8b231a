"""The delivery policies, as pure functions: no Redis, no HTTP, no worker.

Each answers one question a delivery asks (how long to wait for a claim held elsewhere, for a
rate-limit slot, after a store error; whether the retry budget or the 429 budget is spent;
whether a send that may have gone out goes to review; what a call's result tells the breaker)
and the two that turn a failure into an :mod:`outcome <cio_celery.outcomes>`. They are tested
as tables in tests/test_policy.py.
"""

from __future__ import annotations

import random
from typing import Literal

import redis

from .backoff import compute_backoff, retry_delay
from .exceptions import ConfigurationError, DeliveryError, StoreStateError, StoreUnavailableError, TransientError
from .meta import Meta
from .outcomes import DeadLetter, Outcome, Retry
from .settings import SEND_OPERATIONS, Settings

__all__ = [
    "STORE_ERROR_BUDGET",
    "THROTTLE_BUDGET_FACTOR",
    "after_exception",
    "after_failure",
    "breaker_outcome",
    "claim_held",
    "claim_wait",
    "is_store_state_error",
    "is_store_unavailable",
    "rate_limited",
    "retries_exhausted",
    "review_ambiguous",
    "slot_wait",
    "store_full",
    "store_wait",
    "throttle_exhausted",
]

CallOutcome = Literal["success", "failure", "ignore"]

# 429 answers do not spend the retry budget; after this many times (max_retries + 1) of them
# an operation goes to dead letters all the same.
THROTTLE_BUDGET_FACTOR = 10
# A store script that fails (corrupt state, a bug) is retried this many times, then the
# operation goes to dead letters: a fault that does not go away must not spin for ever.
STORE_ERROR_BUDGET = 5
# Longest wait between two looks at a store that cannot be reached.
STORE_WAIT_CAP = 30.0


def claim_wait(held_for: float, timeout: float, max_countdown: float, jitter: float) -> float:
    """Wait before looking again at a claim another worker holds.

    A live holder is done within one HTTP timeout; a dead one's lease ends within ``held_for``.
    ``jitter`` is a draw in [0, 1) that spreads the copies that met the same claim.
    """
    return min(min(held_for, timeout) + jitter, max_countdown)


def slot_wait(wait: float, reserved: int, max_countdown: float, jitter: float) -> float:
    """Wait before coming back for a rate-limit slot: to the reserved slot exactly, or (nothing
    reserved, the slot was beyond the horizon) that long plus up to a second of jitter."""
    if reserved:
        return min(wait, max_countdown)
    return min(wait + jitter * min(wait, 1.0), max_countdown)


def store_wait(waits: int, max_countdown: float, jitter: float) -> float:
    """Wait before the ``waits``-th look at a store that could not be reached: full jitter
    under a ceiling that doubles from 1 s up to 30 s."""
    ceiling = min(STORE_WAIT_CAP, 2.0 ** max(0, min(waits - 1, 16)))
    return min(max(0.05, jitter * ceiling), max_countdown)


def throttle_exhausted(throttled: int, max_retries: int) -> bool:
    """Whether ``throttled`` 429 answers are more than a throttle that ends would give."""
    return throttled > THROTTLE_BUDGET_FACTOR * (max_retries + 1)


def retries_exhausted(spent: int, max_retries: int) -> bool:
    """Whether an operation that spent ``spent`` attempts' retries may not retry again."""
    return spent >= max_retries


def review_ambiguous(operation: str, settings: Settings) -> bool:
    """A transactional send (no idempotency at Customer.io) set to go to review when it may
    have gone out."""
    return operation in SEND_OPERATIONS and settings.ambiguous_policy(operation) == "dead_letter"


def breaker_outcome(error: DeliveryError | None) -> CallOutcome:
    """What a call's result tells the breaker (the trip rule's input).

    Delivered, or refused with a permanent 4xx: the service answered (success). A 429 says
    "slow down", not "down" (ignored), and a request refused before it was sent says nothing
    (ignored). Any other transient failure is a failure.
    """
    if error is None:
        return "success"
    if isinstance(error, TransientError):
        return "ignore" if error.status == 429 else "failure"
    if error.status is None:
        # Refused before it was sent (a URL that is not the operation's route): no evidence.
        return "ignore"
    return "success"


def _free(countdown: float, reason: str, meta: Meta, status: int | None = None, **changes: int) -> Retry:
    return Retry(countdown, reason, True, meta.changed(free=meta.free + 1, slot=0, **changes), status)


# How long an operation waits before trying a full store again (dead letters, the fallback).
FULL_WAIT = 60.0


def store_full(reason: str, meta: Meta, settings: Settings, dead: DeadLetter | None = None) -> Retry:
    """A capped store (dead letters, the fallback) is full: try again in a minute, spending
    nothing; the health report names the full store. A dead letter that found no room carries
    its decision, so that the next attempt writes it without calling Customer.io again."""
    if dead is not None:
        meta = meta.changed(dead_reason=dead.reason, dead_status=dead.status or 0)
    return _free(min(FULL_WAIT, settings.max_countdown), reason, meta)


def claim_held(held_for: float, meta: Meta, settings: Settings, jitter: float) -> Retry:
    """Another worker holds the claim: look again later, never drop, spend nothing."""
    return _free(claim_wait(held_for, settings.timeout, settings.max_countdown, jitter), "claimed_elsewhere", meta)


def rate_limited(wait: float, reserved: int, meta: Meta, settings: Settings, jitter: float) -> Retry:
    """Over the cluster's rate (or paused by a 429): come back when the reserved slot comes,
    presenting it, without spending an attempt or holding a worker process."""
    countdown = slot_wait(wait, reserved, settings.max_countdown, jitter)
    return Retry(countdown, "rate_limited", True, meta.changed(free=meta.free + 1, slot=reserved))


def after_failure(
    operation: str, error: DeliveryError, meta: Meta, retries: int, settings: Settings,
    rng: random.Random | None = None,
) -> Outcome:
    """The outcome of a call that Customer.io did not accept (``retries``: this message's)."""
    s = settings
    if error.maybe_applied and review_ambiguous(operation, s):
        return DeadLetter(f"ambiguous:{error.reason}", error.status, in_doubt=True)
    if not isinstance(error, TransientError):
        return DeadLetter(error.reason, error.status)
    if error.status == 429:
        # Throttled, not failed: wait as told without spending the retry budget.
        throttled = meta.throttled + 1
        if throttle_exhausted(throttled, s.max_retries):
            return DeadLetter("retries_exhausted:http_429", 429)
        countdown = _delay(throttled - 1, error.retry_after, s, rng)
        return _free(countdown, error.reason, meta, 429, throttled=throttled)
    spent = meta.spent(retries)
    if retries_exhausted(spent, s.max_retries):
        return DeadLetter(f"retries_exhausted:{error.reason}", error.status)
    return Retry(_delay(spent, error.retry_after, s, rng), error.reason, False, meta.changed(slot=0), error.status)


def after_exception(exc: BaseException, meta: Meta, settings: Settings, rng: random.Random | None = None) -> Outcome:
    """The outcome of an exception that escaped a delivery attempt before any action.

    The store could not be reached: look again later, without spending an attempt. A store
    script failed: the same, a bounded number of times, then dead letters. Anything else is a
    bug or an unexpected library error: dead letters as ``internal:<type>`` (never its text,
    which may hold payload).
    """
    r = rng or random
    if is_store_unavailable(exc):
        waits = meta.store_waits + 1
        return _free(store_wait(waits, settings.max_countdown, r.random()), "store_unavailable", meta,
                     store_waits=waits)
    if is_store_state_error(exc):
        errors = meta.store_errors + 1
        if errors > STORE_ERROR_BUDGET:
            return DeadLetter(f"store_error:{type(exc).__name__}")
        countdown = compute_backoff(errors, settings.retry_backoff_base, settings.retry_backoff_max, rng)
        return _free(min(countdown, settings.max_countdown), "store_error", meta, store_errors=errors)
    return DeadLetter(f"internal:{type(exc).__name__}")


# Answers of a store that is there but cannot serve now (loading, read-only replica, full,
# cluster resharding): waiting is the cure, as for a store that cannot be reached.
_UNAVAILABLE_ANSWERS: tuple[type[BaseException], ...] = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.BusyLoadingError,
)


def is_store_unavailable(exc: BaseException) -> bool:
    """The store could not be reached or cannot serve now (including no store configured)."""
    if isinstance(exc, _UNAVAILABLE_ANSWERS):
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, StoreUnavailableError)):
        return True
    # No store configured: nothing guards the call, so it is not made; the worker's start-up
    # check and the health report name the setting.
    return isinstance(exc, ConfigurationError) and exc.setting == "redis_url"


def is_store_state_error(exc: BaseException) -> bool:
    """A store script failed or answered what cannot be read (corrupt state, a bug)."""
    return isinstance(exc, (redis.ResponseError, StoreStateError)) and not is_store_unavailable(exc)


def _delay(retries: int, retry_after: float | None, s: Settings, rng: random.Random | None) -> float:
    return retry_delay(
        retries,
        base=s.retry_backoff_base,
        cap=s.retry_backoff_max,
        retry_after=retry_after,
        retry_after_max=s.retry_after_max,
        max_countdown=s.max_countdown,
        rng=rng,
    )
