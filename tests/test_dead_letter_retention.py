"""Dead letters hold customer data: they go once past ``dead_letter_retention`` whether or not a
new dead letter arrives (before, only an add removed the old ones). A real redis-server; the
releaser's tick is the one every worker runs (its thread is not started here). Ages are set by
moving an entry's score in the index (the time it failed), as ``tests/test_cli.py`` does."""

from __future__ import annotations

import time

import redis
from celery import Celery

from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback, Releaser
from cio_celery.settings import build_settings

DAY = 86400.0


def _add(letters: DeadLetters, task_id: str) -> None:
    letters.add(operation="track", task_id=task_id, reason="permanent", status=400, attempts=1,
                args=["user-1", "bought", {"email": "someone@example.com"}], kwargs={})


def _age(store: redis.Redis, prefix: str, ages: dict[str, float]) -> None:
    """Move entries' failure times back (after every add: an add removes the expired ones)."""
    store.zadd(f"{{{prefix}}}:dlq:index", {task_id: time.time() - age for task_id, age in ages.items()}, xx=True)


def test_a_releaser_tick_removes_dead_letters_past_their_retention_and_keeps_the_rest(
    store_url: str, store: redis.Redis
) -> None:
    # Its own key prefix: no running worker's releaser holds this store's lease.
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqage", "dead_letter_retention": 30 * DAY},
                       environ={})
    letters = DeadLetters(s)
    for task_id in ("old", "young", "new"):
        _add(letters, task_id)
    _age(store, "dlqage", {"old": 31 * DAY, "young": 29 * DAY})
    releaser = Releaser(Fallback(s), None)
    releaser.tick()
    assert sorted(e.id for e in letters.list()) == ["new", "young"]
    assert releaser.expired == 1
    held = store.hvals("{dlqage}:dlq:items")
    assert int(store.get("{dlqage}:dlq:bytes") or 0) == sum(len(v) for v in held)


def test_expiry_removes_at_most_its_limit_a_call_oldest_first(store_url: str, store: redis.Redis) -> None:
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqlimit", "dead_letter_retention": DAY},
                       environ={})
    letters = DeadLetters(s)
    for task_id in ("d0", "d1", "d2", "d3", "d4", "kept"):
        _add(letters, task_id)
    _age(store, "dlqlimit", {f"d{i}": (10 - i) * DAY for i in range(5)})  # d0 the oldest
    assert letters.expire(limit=2) == 2
    assert sorted(e.id for e in letters.list()) == ["d2", "d3", "d4", "kept"]
    assert [letters.expire(limit=2) for _ in range(3)] == [2, 1, 0]
    assert [e.id for e in letters.list()] == ["kept"]
    assert int(store.get("{dlqlimit}:dlq:bytes") or 0) == len(store.hget("{dlqlimit}:dlq:items", "kept") or b"")


def test_expired_entries_left_for_later_do_not_fill_the_cap(store_url: str, store: redis.Redis) -> None:
    # An add removes at most 1,000 expired entries; the 1,500 left no longer count against the cap.
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqcap", "dead_letter_retention": DAY,
                        "dead_letter_max": 1000}, environ={})
    letters = DeadLetters(s)
    pipe = store.pipeline()
    for i in range(2500):
        pipe.hset("{dlqcap}:dlq:items", f"x{i}", "{}")
        pipe.zadd("{dlqcap}:dlq:index", {f"x{i}": time.time() - 2 * DAY})
    pipe.execute()
    _add(letters, "fresh")  # before: DLQFULL (2,500 - 1,000 = 1,500 expired left counted, >= 1,000)
    assert letters.count() == 1501
    assert store.hexists("{dlqcap}:dlq:items", "fresh")


def test_a_damaged_dead_letter_store_does_not_stop_the_fallback_release(
    store_url: str, store: redis.Redis
) -> None:
    s = build_settings({"redis_url": store_url, "key_prefix": "dlqbad"}, environ={})
    app = Celery("dlqbad", broker=store_url, set_as_current=False)
    fallback = Fallback(s, app)
    fallback.park("track", "t-1", ["user-1", "parked", {"i": 1}, "01JD0000000000000000000001", None],
                  {"_cio": {"key": "t-1"}})
    store.set("{dlqbad}:dlq:index", "not a sorted set")  # the expiry's ZRANGEBYSCORE fails on it
    releaser = Releaser(fallback, None)
    assert releaser.tick() == 1  # before: the error left tick() before the release
    assert releaser.expired == 0 and fallback.depth() == 0
