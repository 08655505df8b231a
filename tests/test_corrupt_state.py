"""Damaged state in the store and damaged messages degrade, they never lose an operation.

Each test damages one thing as an operator's typo, a foreign writer or a half-applied upgrade
would, then shows through the embedded worker that the operations still end delivered (or in
dead letters, or in the quarantine), that nothing raises, and that nothing spins.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import uuid
from typing import Any

import pytest
import redis

import cio_celery
from cio_celery.breaker import Breaker
from cio_celery.deadletters import DeadLetters
from cio_celery.exceptions import ConfigurationError, EnqueueError, ValidationError
from cio_celery.fallback import Fallback
from cio_celery.health import health_report
from cio_celery.idempotency import Claims
from cio_celery.quarantine import Quarantine
from cio_celery.settings import configure, settings_for_app
from cio_celery.store import key
from cio_celery.testing import FakeCustomerIO
from cio_celery.ulid import new_ulid
from tests.conftest import RecordingHandler
from tests.helpers import wait_until


def breaker_key(app: Any) -> str:
    return key(settings_for_app(app), "breaker", "customerio")


def events(logs: RecordingHandler, name: str) -> list[logging.LogRecord]:
    return [r for r in logs.records if getattr(r, "cio_event", None) == name]


@pytest.mark.parametrize("damage", [
    ("hset", "gen", "garbage"),
    ("hset", "until", "soon"),   # with st=1 below: an open breaker whose end cannot be read
    ("hset", "st", "7"),
    ("set", None, "not a hash"),
    ("window", "cgarbage", "x"),
])
def test_a_breaker_state_that_cannot_be_read_is_reset_to_closed_and_nothing_is_lost(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis, all_logs: RecordingHandler,
    damage: tuple[str, str | None, str],
) -> None:
    kind, field, value = damage
    bkey = breaker_key(worker_app)
    if kind == "hset":
        store.hset(bkey, mapping={"st": 1 if field == "until" else 0, "gen": 3})
        store.hset(bkey, field, value)  # type: ignore[arg-type]
    elif kind == "set":
        store.set(bkey, value)
    else:
        store.hset(f"{bkey}:window", field, value)  # type: ignore[arg-type]
    health = health_report(worker_app)  # documented as never raising
    assert health.breaker is None or health.breaker["state"] == "closed"
    for i in range(3):
        cio_celery.track.delay(f"user-{i}", "after_damage", {"i": i})
    fake.wait_for_applied(3, timeout=15)
    time.sleep(0.3)
    assert len(fake.applied) == 3 and len(fake.requests) == 3
    assert Breaker(settings_for_app(worker_app)).status().state == "closed"
    assert DeadLetters(settings_for_app(worker_app)).count() == 0
    if kind != "window":
        assert int(store.hget(bkey, "corrupt_resets") or 0) == 1, "reset once, then readable"
        assert any(r.levelno == logging.ERROR and "could not be read" in r.getMessage() for r in all_logs.records)
    # No spinning: not a single retry was spent on it.
    assert events(all_logs, "store_error") == [] and events(all_logs, "retry") == []


def test_a_corrupt_limiter_state_is_replaced_not_retried(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis, all_logs: RecordingHandler
) -> None:
    configure(worker_app, rate_limit_track=1000)
    s = settings_for_app(worker_app)
    store.set(key(s, "rl", "track"), "not a number")
    store.hset(key(s, "rl", "track", "pause"), "x", "1")  # a key of the wrong type
    cio_celery.identify.delay("user-1", plan="x")
    fake.wait_for_applied(1, timeout=10)
    assert events(all_logs, "store_error") == []


def test_a_claim_that_would_never_end_is_given_a_lease(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    configure(worker_app, idempotency_lease=2.5)
    claims = Claims(settings_for_app(worker_app))
    claim_key, _marker = claims.keys_for("identify", "signup-1")
    store.set(claim_key, "c:someone-long-gone")  # no expiry: a foreign writer, an old bug
    cio_celery.identify.apply_async(("user-1",), {"plan": "x"}, idempotency_key="signup-1")
    fake.wait_for_applied(1, timeout=20)
    wait_until(lambda: claims.state_of("identify", "signup-1") == "done", what="the done mark")


def test_a_claim_key_of_the_wrong_type_is_replaced(worker_app: Any, fake: FakeCustomerIO, store: redis.Redis) -> None:
    claims = Claims(settings_for_app(worker_app))
    claim_key, _marker = claims.keys_for("identify", "signup-2")
    store.hset(claim_key, "x", "y")
    cio_celery.identify.apply_async(("user-2",), {"plan": "x"}, idempotency_key="signup-2")
    fake.wait_for_applied(1, timeout=10)


@pytest.mark.parametrize("meta", [
    {"key": "k-meta-1", "attempts_before": "x", "slot": "soon"},
    {"key": "k-meta-2", "free": -1, "throttled": [1]},
    "not a mapping",
    {"key": {"nested": 1}},
])
def test_malformed_metadata_is_repaired_and_the_operation_delivered(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler, meta: Any
) -> None:
    # send_task bypasses the producer, as a message from a foreign or older producer would.
    worker_app.send_task("cio_celery.identify", args=["user-1"], kwargs={"plan": "x", "_cio": meta}, queue="cio")
    fake.wait_for_applied(1, timeout=10)
    assert DeadLetters(settings_for_app(worker_app)).count() == 0
    [repaired] = events(all_logs, "metadata_repaired")
    assert repaired.cio_fields  # names the fields, never their values
    assert "soon" not in repaired.getMessage()


def test_an_unreachable_store_means_later_never_lost(
    worker_app: Any, fake: FakeCustomerIO, store_url: str, all_logs: RecordingHandler
) -> None:
    configure(worker_app, redis_url="redis://127.0.0.1:9/0")  # nothing listens there
    cio_celery.track.delay("user-1", "while_the_store_is_down")
    wait_until(lambda: len(events(all_logs, "store_unavailable")) >= 2, timeout=15, what="two looks at the store")
    assert fake.requests == [], "never called unguarded"
    configure(worker_app, redis_url=store_url)
    fake.wait_for_applied(1, timeout=40)
    waits = events(all_logs, "store_unavailable")
    assert all(r.cio_free for r in waits), "waiting for the store spends no attempt"
    assert len(fake.requests) == 1


def test_a_corrupt_entry_at_the_head_of_the_fallback_is_quarantined_and_the_rest_flow(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    s = settings_for_app(worker_app)
    fallback = Fallback(s, worker_app)
    good = []
    for i in range(3):
        tid = str(uuid.uuid4())
        good.append(tid)
        fallback.park("track", tid, [f"user-{i}", "parked", {"i": i}, new_ulid(), None], {"_cio": {"key": tid}})
    fallback_key = key(s, "fallback", "ops")
    store.lpush(fallback_key, b"\xff not json")
    store.rpush(fallback_key, json.dumps({"operation": "rm -rf", "task_id": "t", "args": [], "kwargs": {}}))
    store.rpush(fallback_key, json.dumps({"operation": "identify", "task_id": "t2", "args": [""], "kwargs": {}}))
    assert fallback.release(10, batch=True) == 6
    assert fallback.depth() == 0
    fake.wait_for_applied(3, timeout=15)
    q = Quarantine(s)
    assert sorted(e.why for e in q.entries()) == ["not JSON", "unknown operation"]
    assert all("raw" not in json.dumps(e.summary()) for e in q.entries())
    # The entry that no longer validates is kept for a human, with its reason.
    [letter] = DeadLetters(s).list()
    assert (letter.task_id, letter.reason) == ("t2", "invalid:id")
    assert q.purge() == 2 and q.count() == 0


def test_a_corrupt_dead_letter_is_quarantined_and_every_command_goes_on(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    s = settings_for_app(worker_app)
    letters = DeadLetters(s, worker_app)
    for i in range(2):
        letters.add(operation="delete", task_id=f"t{i}", reason="http_400", status=400, attempts=1,
                    args=[f"u{i}"], kwargs={})
    store.hset(key(s, "dlq", "items"), "broken", b"{not json")
    store.zadd(key(s, "dlq", "index"), {"broken": time.time()})
    store.hset(key(s, "dlq", "items"), "half", json.dumps({"id": "half"}))  # fields missing
    store.zadd(key(s, "dlq", "index"), {"half": time.time()})
    assert [e.task_id for e in letters.list()] == ["t0", "t1"]
    assert letters.get("broken") is None and letters.count() == 2
    assert sorted(e.id for e in Quarantine(s).entries()) == ["dead_letter:broken", "dead_letter:half"]
    assert letters.replay(ids=["t0"]) == 1
    fake.wait_for_applied(1, timeout=10)
    assert letters.purge() == 1 and letters.count() == 0


def test_a_batch_message_with_a_damaged_entry_quarantines_it_and_delivers_the_rest(
    worker_app: Any, fake: FakeCustomerIO
) -> None:
    s = settings_for_app(worker_app)
    entries: list[Any] = []
    for i in range(3):
        tid = str(uuid.uuid4())
        entries.append({"operation": "track", "task_id": tid,
                        "args": [f"user-{i}", "batched", {"i": i}, new_ulid(), None], "kwargs": {"_cio": {"key": tid}}})
    entries.insert(1, {"operation": "track", "task_id": 7})
    entries.append("garbage")
    worker_app.send_task("cio_celery.deliver_batch", args=[entries], queue="cio.fallback")
    fake.wait_for_applied(3, timeout=15)
    wait_until(lambda: Quarantine(s).count() == 2, what="two quarantined entries")
    assert [r.operation for r in fake.requests] == ["batch"]


def test_a_callers_delay_beyond_the_broker_tolerance_is_refused(worker_app: Any, fake: FakeCustomerIO) -> None:
    import datetime

    longest = settings_for_app(worker_app).max_countdown
    with pytest.raises(ValidationError, match="countdown"):
        cio_celery.identify.apply_async(("u",), {"plan": "x"}, countdown=longest + 60)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=longest + 60)
    with pytest.raises(ValidationError, match="eta"):
        cio_celery.identify.apply_async(("u",), {"plan": "x"}, eta=later)
    cio_celery.identify.apply_async(("u",), {"plan": "x"}, countdown=0.2)
    fake.wait_for_applied(1, timeout=10)


def test_callers_cannot_write_the_metadata_or_pick_a_serializer(worker_app: Any, fake: FakeCustomerIO) -> None:
    with pytest.raises(ValidationError, match="_cio"):
        cio_celery.identify.delay("u", _cio={"key": "someone-else", "slot": 1})
    with pytest.raises(ValidationError, match="serializer"):
        cio_celery.identify.apply_async(("u",), {"plan": "x"}, serializer="pickle")
    with pytest.raises(ValidationError, match="150 bytes"):
        cio_celery.identify.apply_async(("u",), {"plan": "x"}, idempotency_key="k" * 151)
    cio_celery.identify.apply_async(("u",), {"plan": "x"}, idempotency_key="é" * 75)  # 150 bytes
    fake.wait_for_applied(1, timeout=10)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("exc", [ConfigurationError("redis_url", "is not set"),
                                 EnqueueError("track", "broker unreachable", spooled=True)])
def test_configuration_and_enqueue_errors_can_be_unpickled(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)


@pytest.mark.parametrize("damage", ["not a number", "another type"])
def test_a_damaged_byte_count_of_the_fallback_neither_stops_parking_nor_releasing(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis, damage: str
) -> None:
    # Before, a park failed on a count of another type (WRONGTYPE) and every release ended in an
    # error after its trim (DECRBY on a count that is not an integer).
    s = settings_for_app(worker_app)
    fallback = Fallback(s, worker_app)
    count_key = key(s, "fallback", "ops", "bytes")

    def spoil() -> None:
        store.delete(count_key)
        if damage == "another type":
            store.hset(count_key, "x", "1")
        else:
            store.set(count_key, "1.5e")

    fallback.park("track", "t-0", ["user-0", "parked", {"i": 0}, new_ulid(), None], {"_cio": {"key": "t-0"}})
    spoil()  # before a park
    fallback.park("track", "t-1", ["user-1", "parked", {"i": 1}, new_ulid(), None], {"_cio": {"key": "t-1"}})
    spoil()  # before a release
    assert fallback.release(1) == 1
    assert fallback.release(10) == 1 and fallback.depth() == 0
    assert store.get(count_key) == b"0"
    fake.wait_for_applied(2, timeout=15)
