"""Idempotency claims: one application per key, through redeliveries, retries and caller keys."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

import cio_celery
from cio_celery.deadletters import DeadLetters
from cio_celery.exceptions import ConfigurationError
from cio_celery.idempotency import Claims
from cio_celery.settings import build_settings, configure, settings_for_app
from cio_celery.testing import FakeCustomerIO
from tests.conftest import RecordingHandler
from tests.helpers import wait_until


def events(logs: RecordingHandler, name: str) -> list[Any]:
    return [r for r in logs.records if getattr(r, "cio_event", None) == name]


# -- the claim protocol itself, against the real store -------------------------------------


@pytest.fixture()
def claims(store: redis.Redis, store_url: str) -> Claims:
    return Claims(build_settings({"redis_url": store_url, "idempotency_lease": 3.0, "timeout": 2.0}, environ={}))


def test_a_claim_is_exclusive_until_released_by_its_owner(claims: Claims) -> None:
    first = claims.claim("track", "k1")
    assert first.state == "claimed" and not first.recovered
    second = claims.claim("track", "k1")
    assert second.state == "held"
    assert 2.0 < second.held_for <= 3.0
    assert claims.release(second) is False, "a non-owner cannot release another worker's claim"
    assert claims.claim("track", "k1").state == "held"
    assert claims.release(first) is True
    third = claims.claim("track", "k1")
    assert third.state == "claimed" and not third.recovered, "a released claim leaves no attempt marker"


def test_done_suppresses_every_later_claim_and_counts_it(claims: Claims) -> None:
    c = claims.claim("identify", "k2")
    assert claims.done(c, "task-1") is True
    assert claims.claim("identify", "k2").state == "done"
    assert claims.claim("identify", "k2").state == "done"
    assert claims.suppressed() == {"identify": 2}
    assert claims.state_of("identify", "k2") == "done"
    assert claims.claim("track", "k2").state == "claimed", "keys are per operation"


def test_an_expired_lease_is_claimable_again_and_reports_the_lost_attempt(
    store: redis.Redis, store_url: str
) -> None:
    short = Claims(build_settings({"redis_url": store_url, "idempotency_lease": 0.3, "timeout": 0.2},
                                  environ={}))
    dead = short.claim("send_email", "k3")  # its worker dies: never released, never done
    assert short.claim("send_email", "k3").state == "held"
    time.sleep(0.45)
    again = short.claim("send_email", "k3")
    assert again.state == "claimed" and again.recovered
    assert short.release(dead) is False, "the dead worker's token no longer owns the key"
    assert short.done(again, "t") is True


def test_done_after_the_lease_ran_out_still_marks_the_operation_applied(
    store: redis.Redis, store_url: str
) -> None:
    short = Claims(build_settings({"redis_url": store_url, "idempotency_lease": 0.2, "timeout": 0.1},
                                  environ={}))
    slow = short.claim("track", "k4")
    time.sleep(0.3)
    other = short.claim("track", "k4")
    assert other.state == "claimed"
    assert short.done(slow, "t1") is False  # reported: two workers may have called
    assert short.claim("track", "k4").state == "done"
    assert short.release(other) is False, "the operation stays done"


def test_key_names_hold_a_hash_not_the_callers_key(claims: Claims, store: redis.Redis) -> None:
    c = claims.claim("identify", "jane.doe@example.com")
    names = [k.decode() for k in store.keys("*")]
    assert names and all("jane" not in n and "example.com" not in n for n in names)
    assert all(n.startswith("{cio}:") for n in names)
    claims.release(c)


def test_retention_shorter_than_the_retry_horizon_is_refused_at_start_up() -> None:
    ok = build_settings({}, environ={})
    assert ok.idempotency_retention >= ok.retry_horizon
    with pytest.raises(ConfigurationError) as info:
        build_settings({"idempotency_retention": 600}, environ={})
    assert info.value.setting == "idempotency_retention"
    assert "retry horizon" in str(info.value)


# -- through real tasks on the embedded worker ---------------------------------------------


def test_the_same_caller_key_twice_is_delivered_once(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    cio_celery.identify.apply_async(("user-1",), {"plan": "pro"}, idempotency_key="signup-42")
    fake.wait_for_applied(1)
    cio_celery.identify.apply_async(("user-1",), {"plan": "pro"}, idempotency_key="signup-42")
    wait_until(lambda: events(all_logs, "duplicate_suppressed"), timeout=10, what="the duplicate to be suppressed")
    time.sleep(0.2)
    assert len(fake.requests) == 1
    assert Claims(settings_for_app(worker_app)).suppressed() == {"identify": 1}


def test_an_attribute_named_like_the_option_is_an_attribute_not_a_key(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    cio_celery.identify.delay("user-1", idempotency_key="attr-value")
    cio_celery.identify.delay("user-1", idempotency_key="attr-value")
    applied = fake.wait_for_applied(2)
    assert [a.json for a in applied] == [{"idempotency_key": "attr-value"}] * 2


def test_a_redelivered_message_with_the_same_task_id_is_delivered_once(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    # What a broker redelivery looks like to the worker: the same task id, the same message.
    cio_celery.delete.apply_async(("user-9",), task_id="fixed-task-id-1")
    fake.wait_for_applied(1)
    cio_celery.delete.apply_async(("user-9",), task_id="fixed-task-id-1")
    wait_until(lambda: events(all_logs, "duplicate_suppressed"), timeout=10, what="the duplicate to be suppressed")
    assert len(fake.requests) == 1


def test_a_claim_held_by_another_worker_means_later_not_never(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    settings = settings_for_app(worker_app)
    other_worker = Claims(settings.with_changes(idempotency_lease=1.5, timeout=1.0))
    held = other_worker.claim("suppress", "op-held")
    assert held.owned
    started = time.monotonic()
    cio_celery.suppress.apply_async(("user-3",), idempotency_key="op-held")
    wait_until(lambda: events(all_logs, "claim_held"), timeout=10, what="the worker to see the held claim")
    assert fake.requests == []
    fake.wait_for_applied(1, timeout=15)  # the other worker died: its lease ends, this one delivers
    assert time.monotonic() - started >= 1.2
    assert len(fake.requests) == 1
    assert DeadLetters(settings, worker_app).count() == 0
    [held_log] = events(all_logs, "claim_held")[:1]
    assert held_log.cio_outcome == "retry"


def test_a_failed_attempt_releases_its_claim_so_the_retry_can_deliver(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    fake.fail_next(2, status=503)
    cio_celery.track.delay("user-1", "x")
    reqs = fake.wait_for_requests(3, timeout=15)
    assert [r.status for r in reqs] == [503, 503, 200]
    assert len(fake.applied) == 1


def test_a_permanent_failure_releases_the_claim_so_a_replay_delivers(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    fake.fail_next(1, status=400)
    cio_celery.identify.apply_async(("user-1",), {"plan": "x"}, idempotency_key="replay-me")
    dlq = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_until(lambda: dlq.count() == 1, timeout=10, what="the dead letter")
    [letter] = dlq.list()
    assert dlq.replay([letter.id]) == 1
    fake.wait_for_applied(1, timeout=10)
    assert [r.status for r in fake.requests] == [400, 200]


# -- ambiguous outcomes ----------------------------------------------------------------------


EMAIL = {"transactional_message_id": 3, "to": "jane@example.com", "identifiers": {"id": "u1"}}


def test_a_send_that_timed_out_after_sending_goes_to_review_not_out_twice(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    fake.timeout_next(1, delay=3.0)
    cio_celery.send_email.delay(dict(EMAIL))
    dlq = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_until(lambda: dlq.count() == 1, timeout=15, what="the ambiguous send to be dead-lettered")
    [letter] = dlq.list()
    assert letter.reason == "ambiguous:timeout"
    time.sleep(0.5)
    assert len(fake.requests) == 1, "not retried"


def test_a_send_with_a_503_goes_to_review_but_a_429_is_retried(worker_app: Any, fake: FakeCustomerIO) -> None:
    dlq = DeadLetters(settings_for_app(worker_app), worker_app)
    fake.fail_next(1, status=429, retry_after=0)
    cio_celery.send_sms.delay({"transactional_message_id": 4, "to": "+15555550100", "identifiers": {"id": "u"}})
    fake.wait_for_applied(1, timeout=10)
    assert dlq.count() == 0
    fake.fail_next(1, status=503)
    cio_celery.send_push.delay({"transactional_message_id": 5, "identifiers": {"id": "u"}})
    wait_until(lambda: dlq.count() == 1, timeout=10, what="the 503 send to be dead-lettered")
    assert dlq.list()[0].reason == "ambiguous:http_503"


def test_ambiguous_sends_can_be_set_to_retry_per_operation(worker_app: Any, fake: FakeCustomerIO) -> None:
    configure(worker_app, ambiguous_sends="send_email=retry")
    fake.fail_next(1, status=502)
    cio_celery.send_email.delay(dict(EMAIL))
    reqs = fake.wait_for_requests(2, timeout=10)
    assert [r.status for r in reqs] == [502, 200]
    assert settings_for_app(worker_app).ambiguous_policy("send_sms") == "dead_letter"


def test_events_are_retried_after_an_ambiguous_timeout_and_applied_once(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    fake.timeout_next(1, delay=3.0)
    cio_celery.track.delay("user-1", "paid", {"n": 1})
    wait_until(lambda: len(fake.applied) == 1 and len(fake.requests) == 2, timeout=20,
               what="the retry after the timeout")
    assert len(fake.applied) == 1


def test_a_bad_ambiguous_sends_setting_names_the_setting() -> None:
    with pytest.raises(ConfigurationError) as info:
        build_settings({"ambiguous_sends": "send_mail=retry"}, environ={})
    assert info.value.setting == "ambiguous_sends"
    assert "send_email" in str(info.value)


def test_a_done_mark_the_stopped_store_could_not_take_is_written_when_it_returns(tmp_path: Any) -> None:
    """Delivered, then the store stops before the done mark: the process keeps the mark and
    writes it once the store is back, so a copy finds the operation done instead of sending
    again when the claim's lease has run out."""
    from cio_celery.guard import Guard, pending_marks
    from cio_celery.testing.redis_server import RedisServer

    with RedisServer(appendonly=True) as server:
        s = build_settings({"redis_url": f"{server.url}/0", "rate_limit_track": 0.0, "timeout": 1.0}, environ={})
        before = pending_marks().written
        with Guard(s, "track", "key-stopped", "task-stopped") as guard:
            guard.take()
            assert guard.claim is not None and guard.claim.state == "claimed"


            def send() -> dict[str, Any]:
                server.stop()  # the store goes while Customer.io answers
                return {}

            guard.call(send)  # accepted: settled at once, and the store refuses the done mark
        assert pending_marks().pending(s) >= 1, "the mark waits for the store"
        time.sleep(0.6)  # the pending thread tries again while the store is down: still kept
        assert pending_marks().pending(s) >= 1
        server.start()
        wait_until(lambda: pending_marks().pending(s) == 0, timeout=15)
        assert pending_marks().written > before
        assert Claims(s).claim("track", "key-stopped").state == "done", "a copy is suppressed"
