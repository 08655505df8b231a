"""Dead letters hold customer data: they go once past ``dead_letter_retention`` whether or not a
new dead letter arrives (before, only an add removed the old ones). A real redis-server; the
releaser's tick is the one every worker runs (its thread is not started here)."""

from __future__ import annotations

import time

import redis

from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback, Releaser
from cio_celery.settings import build_settings


def _add(letters: DeadLetters, task_id: str) -> None:
    letters.add(operation="track", task_id=task_id, reason="permanent", status=400, attempts=1,
                args=["user-1", "bought", {"email": "someone@example.com"}], kwargs={})


def test_a_releaser_tick_removes_dead_letters_past_their_retention_and_keeps_the_rest(
    store_url: str, store: redis.Redis
) -> None:
    # Its own key prefix: no running worker's releaser holds this store's lease.
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqage", "dead_letter_retention": 2.0},
                       environ={})
    letters = DeadLetters(s)
    _add(letters, "old")
    time.sleep(1.2)
    _add(letters, "young")  # "old" is 1.2 s old: kept by this add
    assert letters.count() == 2
    time.sleep(1.0)  # "old" is 2.2 s old, "young" 1.0 s
    releaser = Releaser(Fallback(s), None)
    releaser.tick()
    assert [e.id for e in letters.list()] == ["young"]
    assert releaser.expired == 1
    young = store.hget("{dlqage}:dlq:items", "young")
    assert young is not None
    assert int(store.get("{dlqage}:dlq:bytes") or 0) == len(young)
    assert store.hlen("{dlqage}:dlq:items") == 1


def test_expiry_removes_at_most_its_limit_oldest_first(store_url: str, store: redis.Redis) -> None:
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqlimit", "dead_letter_retention": 1.0},
                       environ={})
    letters = DeadLetters(s)
    for i in range(5):
        _add(letters, f"d{i}")
    time.sleep(1.2)
    assert [letters.expire(limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert letters.count() == 0 and store.hlen("{dlqlimit}:dlq:items") == 0
    assert int(store.get("{dlqlimit}:dlq:bytes") or 0) == 0
