"""Transient failures retry with backoff, Retry-After is honoured, permanent ones dead-letter."""

from __future__ import annotations

import time
from typing import Any

import pytest

import cio_celery
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import configure, settings_for_app
from cio_celery.testing import FakeCustomerIO
from tests.conftest import RecordingHandler
from tests.helpers import wait_until


def dlq(app: Any) -> DeadLetters:
    return DeadLetters(settings_for_app(app), app)


def retry_records(logs: RecordingHandler) -> list[Any]:
    return [r for r in logs.records if getattr(r, "cio_event", None) == "retry"]


def test_503_then_success_is_delivered_once_after_a_backoff(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    fake.fail_next(1, status=503)
    cio_celery.track.delay("user-1", "signed_up", {"plan": "pro"})
    first, second = fake.wait_for_requests(2, timeout=15)
    assert (first.status, second.status) == (503, 200)
    assert first.json == second.json, "the retry must send the same event (same id)"
    assert len(fake.wait_for_applied(1)) == 1
    [retry] = retry_records(all_logs)
    assert retry.cio_reason == "http_503"
    assert 0 <= retry.cio_countdown <= 0.05 * 2**0  # full jitter under the first ceiling
    assert retry.cio_attempt == 1
    time.sleep(0.3)
    assert len(fake.requests) == 2
    assert dlq(worker_app).count() == 0


def test_backoff_ceilings_grow_exponentially_up_to_the_cap(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    fake.fail_next(3, status=502)
    cio_celery.identify.delay("user-1", plan="pro")
    reqs = fake.wait_for_requests(4, timeout=15)
    assert [r.status for r in reqs] == [502, 502, 502, 200]
    countdowns = [r.cio_countdown for r in retry_records(all_logs)]
    ceilings = [min(0.2, 0.05 * 2**n) for n in range(3)]
    assert len(countdowns) == 3
    assert all(0 <= c <= ceil for c, ceil in zip(countdowns, ceilings, strict=True))


def test_429_with_retry_after_waits_that_long(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(1, status=429, retry_after=1)
    cio_celery.track.delay("user-1", "signed_up")
    first, second = fake.wait_for_requests(2, timeout=15)
    assert first.status == 429
    gap = second.received_at - first.received_at
    assert gap >= 1.0, f"retried after {gap:.3f}s despite Retry-After: 1"
    assert gap < 3.0


def test_400_goes_to_dead_letters_after_one_attempt(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(1, status=400)
    result = cio_celery.identify.delay("user-1", plan="pro")
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, what="a dead letter")
    time.sleep(0.3)
    assert len(fake.requests) == 1, "a permanent 4xx must never be retried"
    [entry] = store.list()
    assert entry.task_id == result.id
    assert (entry.operation, entry.reason, entry.status, entry.attempts) == ("identify", "http_400", 400, 1)
    assert entry.args == ["user-1"]
    assert entry.kwargs["plan"] == "pro"
    assert entry.failed_at > time.time() - 60


def test_exhausted_retries_go_to_dead_letters(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(10, status=503)
    cio_celery.track.delay("user-1", "signed_up")
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, timeout=15, what="a dead letter")
    [entry] = store.list()
    assert entry.reason == "retries_exhausted:http_503"
    assert entry.attempts == 4  # max_retries=3 in the test config
    assert len(fake.requests) == 4
    assert fake.applied == []


def test_a_timeout_is_retried_and_the_event_id_lets_customerio_drop_the_duplicate(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    configure(worker_app, timeout=0.5)
    fake.timeout_next(1, delay=1.0)
    cio_celery.track.delay("user-1", "signed_up")
    reqs = fake.wait_for_requests(2, timeout=15)
    assert reqs[0].json["id"] == reqs[1].json["id"]
    time.sleep(1.0)
    # The timed-out request was saved by the server; the retry is recognised as a duplicate.
    assert len(fake.applied) == 1
    assert fake.stats["duplicates_ignored"] == 1


def test_a_connection_reset_is_retried(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.reset_next(1)
    cio_celery.delete.delay("user-1")
    reqs = fake.wait_for_requests(2, timeout=15)
    assert reqs[-1].status == 200
    assert len(fake.applied) == 1


def test_dead_letters_replay_delivers_and_removes_the_entry(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(1, status=400)
    cio_celery.track.delay("user-1", "signed_up", {"n": 1})
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, what="a dead letter")
    first_id = fake.requests[0].json["id"]
    assert store.replay() == 1
    wait_until(lambda: len(fake.applied) == 1, what="the replayed delivery")
    assert fake.requests[-1].json["id"] == first_id, "a replay keeps the event id"
    assert store.count() == 0


def test_dead_letters_filters_and_purge(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(2, status=422)
    cio_celery.identify.delay("user-1", plan="a")
    cio_celery.delete.delay("user-2")
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 2, what="two dead letters")
    assert [e.operation for e in store.list(operation="delete")] == ["delete"]
    assert store.list(older_than=3600) == []
    assert store.purge(operation="identify") == 1
    assert [e.operation for e in store.list()] == ["delete"]
    assert "kwargs" not in store.list()[0].summary()


def test_dead_letters_are_bounded_and_a_full_store_refuses_instead_of_dropping(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    import redis as redis_lib

    configure(worker_app, dead_letter_max=3)
    store = dlq(worker_app)
    for i in range(3):
        store.add(operation="delete", task_id=f"t{i}", reason="http_400", status=400, attempts=1,
                  args=[f"u{i}"], kwargs={})
    with pytest.raises(redis_lib.ResponseError, match="DLQFULL"):
        store.add(operation="delete", task_id="t3", reason="http_400", status=400, attempts=1,
                  args=["u3"], kwargs={})
    assert [e.task_id for e in store.list()] == ["t0", "t1", "t2"], "nothing old was dropped"
    store.add(operation="delete", task_id="t1", reason="http_410", status=410, attempts=2,
              args=["u1"], kwargs={})  # the same id again replaces its entry, full or not
    assert store.delete("t0")
    store.add(operation="delete", task_id="t3", reason="http_400", status=400, attempts=1, args=["u3"], kwargs={})
    assert sorted(e.task_id for e in store.list()) == ["t1", "t2", "t3"]
    count, used = store.usage()
    raw = redis_lib.Redis.from_url(settings_for_app(worker_app).redis_url)
    items = "{cio}:dlq:items"
    assert count == 3 and used == sum(raw.hstrlen(items, i) for i in raw.hkeys(items)), "the byte count follows"


@pytest.mark.parametrize("status", [401, 403, 404, 413])
def test_other_4xx_are_permanent(worker_app: Any, fake: FakeCustomerIO, status: int) -> None:
    fake.fail_next(1, status=status)
    cio_celery.suppress.delay("user-1")
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, what="a dead letter")
    assert store.list()[0].status == status
    assert len(fake.requests) == 1


def test_a_message_that_fails_validation_on_the_worker_goes_to_dead_letters(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    # send_task bypasses the producer-side checks, like a message from an older producer.
    worker_app.send_task("cio_celery.track", args=["", "signed_up"], kwargs={"_cio": {"key": "k1"}}, queue="cio")
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, what="a dead letter")
    [entry] = store.list()
    assert entry.reason == "invalid:customer_id"
    assert entry.attempts == 1
    assert fake.requests == []


def test_missing_credentials_on_the_worker_dead_letter_with_the_setting_name(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    configure(worker_app, app_api_key=None)
    # The producer shares the app here; clear the key only for the worker's settings object.
    settings = settings_for_app(worker_app)
    if settings.app_api_key:
        pytest.skip("the environment provides CIO_APP_API_KEY")
    cio_celery.send_sms.delay({"transactional_message_id": 1, "identifiers": {"id": "u1"}})
    store = dlq(worker_app)
    wait_until(lambda: store.count() == 1, what="a dead letter")
    assert store.list()[0].reason == "not_configured"
    assert fake.requests == []
    assert any("CIO_APP_API_KEY is not set" in t for t in all_logs.texts)


def test_429s_do_not_spend_the_retry_budget(worker_app: Any, fake: FakeCustomerIO) -> None:
    # max_retries is 3 in this suite: six 429s in a row still end delivered.
    fake.fail_next(6, status=429, retry_after=0)
    cio_celery.track.delay("user-1", "throttled")
    reqs = fake.wait_for_requests(7, timeout=20)
    assert [r.status for r in reqs] == [429] * 6 + [200]
    assert len(fake.wait_for_applied(1)) == 1
    assert dlq(worker_app).count() == 0


def test_a_throttle_that_never_ends_still_ends_in_dead_letters(worker_app: Any, fake: FakeCustomerIO) -> None:
    configure(worker_app, max_retries=0)  # budget for 429s: 10 x (0 + 1)
    fake.fail_next(50, status=429, retry_after=0)
    cio_celery.identify.delay("user-1", plan="x")
    wait_until(lambda: dlq(worker_app).count() == 1, timeout=30, what="the dead letter")
    [letter] = dlq(worker_app).list()
    assert letter.reason == "retries_exhausted:http_429"
    assert len(fake.requests) == 11
