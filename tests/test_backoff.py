"""Backoff is pure: full jitter under an exponential ceiling, Retry-After as a floor."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from cio_celery.backoff import compute_backoff, retry_delay


@given(st.integers(0, 200), st.floats(0.01, 10), st.floats(10, 1000), st.integers(0, 2**32))
def test_full_jitter_stays_between_zero_and_the_ceiling(retries: int, base: float, cap: float, seed: int) -> None:
    delay = compute_backoff(retries, base, cap, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2**retries)


def test_full_jitter_uses_the_whole_range() -> None:
    rng = random.Random(7)
    draws = [compute_backoff(3, 1.0, 100.0, rng) for _ in range(2000)]
    assert min(draws) < 0.5
    assert max(draws) > 7.5
    assert 3.5 < sum(draws) / len(draws) < 4.5  # uniform on [0, 8]


def test_retry_after_is_a_floor_with_a_little_jitter() -> None:
    rng = random.Random(1)
    for _ in range(200):
        d = retry_delay(0, base=1, cap=10, retry_after=30, retry_after_max=900, max_countdown=3000, rng=rng)
        assert 30 <= d <= 31


def test_retry_after_is_cut_to_its_cap() -> None:
    d = retry_delay(0, base=1, cap=10, retry_after=86400, retry_after_max=900, max_countdown=3000,
                    rng=random.Random(2))
    assert 900 <= d <= 901


@given(st.integers(0, 50), st.one_of(st.none(), st.floats(0, 1e6)), st.floats(1, 5000))
def test_every_countdown_stays_below_the_visibility_margin(
    retries: int, retry_after: float | None, max_countdown: float
) -> None:
    d = retry_delay(retries, base=2, cap=1e6, retry_after=retry_after, retry_after_max=1e6,
                    max_countdown=max_countdown)
    assert 0 <= d <= max_countdown
