"""The delivery policies as tables: pure functions, no Redis, no worker."""

from __future__ import annotations

import pickle
import random

import pytest
import redis

from cio_celery.exceptions import (
    ConfigurationError,
    EnqueueError,
    PermanentError,
    StoreStateError,
    StoreUnavailableError,
    TransientError,
)
from cio_celery.meta import Meta
from cio_celery.outcomes import DeadLetter, Retry
from cio_celery.policy import (
    STORE_ERROR_BUDGET,
    after_exception,
    after_failure,
    breaker_outcome,
    claim_held,
    claim_wait,
    rate_limited,
    retries_exhausted,
    review_ambiguous,
    slot_wait,
    store_wait,
    throttle_exhausted,
)
from cio_celery.settings import Settings

S = Settings(max_retries=3, retry_backoff_base=1.0, retry_backoff_max=8.0, retry_after_max=30.0,
             visibility_timeout=3600, timeout=10.0)
META = Meta(key="k")


@pytest.mark.parametrize(("held_for", "timeout", "max_countdown", "jitter", "expected"), [
    (75.0, 10.0, 3240.0, 0.0, 10.0),   # a live holder answers within one HTTP timeout
    (2.0, 10.0, 3240.0, 0.5, 2.5),     # a lease ending sooner: look when it ends
    (0.0, 10.0, 3240.0, 0.99, 0.99),   # an expired lease: at once, spread by the jitter
    (75.0, 10.0, 5.0, 0.5, 5.0),       # never beyond the longest countdown
])
def test_claim_wait(held_for: float, timeout: float, max_countdown: float, jitter: float, expected: float) -> None:
    assert claim_wait(held_for, timeout, max_countdown, jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("wait", "reserved", "max_countdown", "jitter", "expected"), [
    (3.0, 123, 100.0, 0.9, 3.0),    # a reserved slot: exactly when it comes
    (3.0, 0, 100.0, 0.5, 3.5),      # nothing reserved: up to a second later
    (0.2, 0, 100.0, 0.5, 0.3),      # the jitter never exceeds the wait itself
    (500.0, 7, 100.0, 0.0, 100.0),  # capped
])
def test_slot_wait(wait: float, reserved: int, max_countdown: float, jitter: float, expected: float) -> None:
    assert slot_wait(wait, reserved, max_countdown, jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("waits", "jitter", "expected"), [
    (1, 1.0, 1.0), (2, 1.0, 2.0), (3, 0.5, 2.0), (6, 1.0, 30.0), (60, 1.0, 30.0), (1, 0.0, 0.05),
])
def test_store_wait_doubles_to_30_seconds_with_full_jitter(waits: int, jitter: float, expected: float) -> None:
    assert store_wait(waits, 3240.0, jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("throttled", "max_retries", "exhausted"), [
    (1, 0, False), (10, 0, False), (11, 0, True), (40, 3, False), (41, 3, True),
])
def test_throttle_budget(throttled: int, max_retries: int, exhausted: bool) -> None:
    assert throttle_exhausted(throttled, max_retries) is exhausted


@pytest.mark.parametrize(("spent", "max_retries", "exhausted"), [(0, 0, True), (0, 3, False), (2, 3, False),
                                                                  (3, 3, True), (9, 3, True)])
def test_retries_budget(spent: int, max_retries: int, exhausted: bool) -> None:
    assert retries_exhausted(spent, max_retries) is exhausted


@pytest.mark.parametrize(("operation", "policy", "review"), [
    ("send_email", "dead_letter", True),
    ("send_email", "retry", False),
    ("send_sms", "send_email=retry", True),   # unnamed sends keep the default, dead_letter
    ("send_email", "send_email=retry", False),
    ("track", "dead_letter", False),         # an event carries an id: Customer.io drops a repeat
    ("identify", "dead_letter", False),
])
def test_ambiguous_sends_go_to_review(operation: str, policy: str, review: bool) -> None:
    assert review_ambiguous(operation, Settings(ambiguous_sends=policy)) is review


@pytest.mark.parametrize(("error", "outcome"), [
    (None, "success"),
    (PermanentError("x", "http_400", status=400), "success"),   # the service answered
    (PermanentError("x", "invalid:url"), "ignore"),             # never sent
    (TransientError("x", "http_429", status=429), "ignore"),    # slow down, not down
    (TransientError("x", "http_503", status=503), "failure"),
    (TransientError("x", "timeout"), "failure"),
    (TransientError("x", "connection"), "failure"),
])
def test_what_a_call_tells_the_breaker(error: object, outcome: str) -> None:
    assert breaker_outcome(error) == outcome  # type: ignore[arg-type]


def test_a_held_claim_and_a_rate_limit_retry_for_free_and_keep_the_slot() -> None:
    r = claim_held(75.0, META.changed(slot=99), S, 0.25)
    assert (r.reason, r.free, r.countdown, r.meta.free, r.meta.slot) == ("claimed_elsewhere", True, 10.25, 1, 0)
    r = rate_limited(2.0, 1234, META, S, 0.7)
    assert (r.reason, r.free, r.countdown, r.meta.free, r.meta.slot) == ("rate_limited", True, 2.0, 1, 1234)


# after_failure: (operation, error, meta, this message's retries) -> outcome
FAILURES = [
    # a permanent 4xx: dead letters at once, whatever the budget
    ("identify", PermanentError("identify", "http_400", status=400), META, 0, DeadLetter("http_400", 400)),
    # a transient failure with budget left: a retry that spends an attempt
    ("track", TransientError("track", "http_503", status=503, maybe_applied=True), META, 0, "retry:spent"),
    # the last attempt spent: dead letters
    ("track", TransientError("track", "http_503", status=503), META, 3,
     DeadLetter("retries_exhausted:http_503", 503)),
    # attempts spent before parking count; free retries do not
    ("track", TransientError("track", "timeout"), META.changed(attempts_before=2), 1,
     DeadLetter("retries_exhausted:timeout")),
    ("track", TransientError("track", "timeout"), META.changed(attempts_before=2, free=5), 5, "retry:spent"),
    # a 429 retries for free, throttled counted, until the 429 budget (10 x (3 + 1)) is spent
    ("identify", TransientError("identify", "http_429", status=429, retry_after=2.0), META, 0, "retry:free"),
    ("identify", TransientError("identify", "http_429", status=429), META.changed(throttled=40), 0,
     DeadLetter("retries_exhausted:http_429", 429)),
    # a send that may have gone out goes to review (default), one that cannot have gone out retries
    ("send_email", TransientError("send_email", "timeout", maybe_applied=True), META, 0,
     DeadLetter("ambiguous:timeout", None, in_doubt=True)),
    ("send_email", TransientError("send_email", "http_503", status=503, maybe_applied=True), META, 0,
     DeadLetter("ambiguous:http_503", 503, in_doubt=True)),
    ("send_email", TransientError("send_email", "connect_timeout", maybe_applied=False), META, 0, "retry:spent"),
    ("send_email", TransientError("send_email", "http_429", status=429), META, 0, "retry:free"),
]


@pytest.mark.parametrize(("operation", "error", "meta", "retries", "expected"), FAILURES)
def test_after_failure(operation: str, error: TransientError, meta: Meta, retries: int, expected: object) -> None:
    out = after_failure(operation, error, meta, retries, S, random.Random(1))
    if isinstance(expected, str):
        assert isinstance(out, Retry)
        assert out.free is (expected == "retry:free")
        assert out.reason == error.reason and out.status == error.status
        assert 0 <= out.countdown <= S.max_countdown
        if error.retry_after:
            assert out.countdown >= error.retry_after, "Retry-After is a floor"
        if out.free:
            assert out.meta.free == meta.free + 1 and out.meta.throttled == meta.throttled + 1
        else:
            assert out.meta.free == meta.free
    else:
        assert out == expected


EXCEPTIONS = [
    (redis.ConnectionError("down"), "retry:store_unavailable"),
    (redis.TimeoutError("slow"), "retry:store_unavailable"),
    (redis.exceptions.BusyLoadingError("loading"), "retry:store_unavailable"),
    (redis.exceptions.ReadOnlyError("replica"), "retry:store_unavailable"),
    (redis.exceptions.OutOfMemoryError("full"), "retry:store_unavailable"),
    (ConnectionRefusedError(), "retry:store_unavailable"),
    (StoreUnavailableError(), "retry:store_unavailable"),
    (ConfigurationError("redis_url", "is not set"), "retry:store_unavailable"),
    (redis.ResponseError("ERR user_script:12: attempt to compare nil with number"), "retry:store_error"),
    (StoreStateError("unreadable"), "retry:store_error"),
    (ConfigurationError("timeout", "bad"), DeadLetter("internal:ConfigurationError")),
    (ValueError("invalid literal for int() with base 10: 'ada@example.com'"), DeadLetter("internal:ValueError")),
    (KeyError("x"), DeadLetter("internal:KeyError")),
]


@pytest.mark.parametrize(("exc", "expected"), EXCEPTIONS)
def test_after_exception(exc: BaseException, expected: object) -> None:
    out = after_exception(exc, META, S, random.Random(2))
    if isinstance(expected, str):
        assert isinstance(out, Retry) and out.free
        assert out.reason == expected.split(":", 1)[1]
    else:
        assert out == expected
        assert "example.com" not in repr(out), "an exception's text never reaches the outcome"


def test_store_errors_are_retried_a_bounded_number_of_times_then_dead_lettered() -> None:
    meta = META
    for n in range(1, STORE_ERROR_BUDGET + 1):
        out = after_exception(redis.ResponseError("x"), meta, S, random.Random(n))
        assert isinstance(out, Retry) and out.meta.store_errors == n
        meta = out.meta
    assert after_exception(redis.ResponseError("x"), meta, S) == DeadLetter("store_error:ResponseError")


def test_an_unreachable_store_is_waited_for_with_growing_waits_and_never_dead_lettered() -> None:
    meta = META
    for _ in range(50):
        out = after_exception(redis.ConnectionError(), meta, S, random.Random(0))
        assert isinstance(out, Retry) and 0 < out.countdown <= 30.0
        meta = out.meta
    assert meta.store_waits == 50


# Meta.parse: (raw, expected fields, repaired fields)
METAS = [
    (None, {"key": "tid"}, ()),
    ({"key": "k1", "attempts_before": 2, "free": 1, "slot": 5, "throttled": 3, "event_id": "01H"},
     {"key": "k1", "attempts_before": 2, "free": 1, "slot": 5, "throttled": 3, "event_id": "01H"}, ()),
    ({"key": "k1", "attempts_before": "2"}, {"attempts_before": 2}, ()),
    ({"key": "k1", "attempts_before": "x"}, {"attempts_before": 0}, ("_cio.attempts_before",)),
    ({"key": "k1", "slot": "soon"}, {"slot": 0}, ("_cio.slot",)),
    ({"key": "k1", "free": -3, "throttled": 1.5}, {"free": 0, "throttled": 0}, ("_cio.free", "_cio.throttled")),
    ({"key": "k1", "free": True}, {"free": 0}, ("_cio.free",)),
    ({"key": 42}, {"key": "tid"}, ("_cio.key",)),
    ({"key": "x" * 1000}, {"key": "tid"}, ("_cio.key",)),
    ({"key": "k1", "event_id": {"a": 1}}, {"event_id": None}, ("_cio.event_id",)),
    ("garbage", {"key": "tid"}, ("_cio",)),
    ({"key": "k1", "enqueued_at": float("nan")}, {"enqueued_at": None}, ()),
]


@pytest.mark.parametrize(("raw", "fields", "problems"), METAS)
def test_metadata_is_parsed_once_and_never_raises(raw: object, fields: dict[str, object],
                                                  problems: tuple[str, ...]) -> None:
    meta = Meta.parse(raw, "tid")
    for name, value in fields.items():
        assert getattr(meta, name) == value, name
    assert meta.problems == problems
    assert Meta.parse(meta.as_dict(), "other") == meta, "round trip"


@pytest.mark.parametrize(("meta", "retries", "spent"), [
    (Meta(key="k"), 0, 0), (Meta(key="k"), 3, 3), (Meta(key="k", attempts_before=2), 1, 3),
    (Meta(key="k", free=5), 3, 0), (Meta(key="k", attempts_before=1, free=2), 4, 3),
])
def test_attempts_spent(meta: Meta, retries: int, spent: int) -> None:
    assert meta.spent(retries) == spent


@pytest.mark.parametrize("exc", [
    ConfigurationError("redis_url", "is not set"),
    EnqueueError("track", "broker unreachable", spooled=True),
    StoreStateError("x"),
])
def test_every_error_survives_pickling(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert back.__dict__ == exc.__dict__
