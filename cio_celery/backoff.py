"""Pure retry-delay computation: exponential backoff with full jitter, Retry-After aware."""

from __future__ import annotations

import random

__all__ = ["compute_backoff", "retry_delay"]


def compute_backoff(
    retries: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Full jitter: a uniform draw in ``[0, min(cap, base * 2**retries)]``.

    Full jitter (rather than equal jitter) spreads the retries of many workers that
    failed together, which is what an outage produces.
    """
    ceiling = min(cap, base * (2.0 ** min(retries, 62)))
    return (rng or random).uniform(0.0, ceiling)


def retry_delay(
    retries: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None,
    retry_after_max: float,
    max_countdown: float,
    rng: random.Random | None = None,
) -> float:
    """The countdown before the next attempt, never above ``max_countdown``.

    A server's Retry-After is a floor (cut to ``retry_after_max``), with up to 10%
    jitter on top so the workers it paused do not return in one burst.
    """
    if retry_after is not None and retry_after > 0:
        floor = min(retry_after, retry_after_max)
        delay = floor + (rng or random).uniform(0.0, min(1.0, 0.1 * floor))
    else:
        delay = compute_backoff(retries, base, cap, rng)
    return min(delay, max_countdown)
