"""Done marks by kind of key: a task id lives the redelivery horizon, a caller key its retention.

Marks are 64-bit digests in time-bucketed integer sets (docs/idempotency.md). The horizon's
edge is driven with the claims' clock (as the breaker's tests drive theirs): a mark is written
"earlier" and looked up just inside and just past its horizon; its set's real expiry is read
from Redis.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Any

import pytest
import redis

import cio_celery
from cio_celery.idempotency import Claims, bucket_ms
from cio_celery.ledger import Ledger
from cio_celery.settings import Settings, build_settings, settings_for_app
from cio_celery.store import SHARDS, run_pipelined
from cio_celery.testing import FakeCustomerIO
from tests.helpers import wait_until


@pytest.fixture()
def settings(store: redis.Redis, store_url: str) -> Settings:
    return build_settings({"redis_url": store_url}, environ={})


def at(settings: Settings, when: float) -> Claims:
    return Claims(settings, clock=lambda: when)


def mark_sets(store: redis.Redis) -> list[str]:
    """The done-mark sets in the store."""
    return sorted(k.decode() for k in store.keys("*") if store.type(k) == b"set")


def delivered(claims: Claims, operation: str, key: str, task_id: str) -> None:
    claim = claims.claim(operation, key, task_id)
    assert claim.state == "claimed"
    assert claims.done(claim, task_id) is True


def test_a_task_id_duplicate_is_suppressed_up_to_its_horizon_and_not_past_it(
    settings: Settings, store: redis.Redis
) -> None:
    horizon = settings.task_key_retention
    assert horizon == settings.redelivery_horizon > settings.retry_horizon
    width = bucket_ms(int(horizon * 1000)) / 1000
    t0 = time.time() - horizon + 30  # delivered just under a horizon ago: its set expires in >= 30 s
    delivered(at(settings, t0), "track", "task-1", "task-1")
    [mark] = mark_sets(store)
    expires = store.pexpiretime(mark) / 1000
    assert t0 + horizon <= expires <= t0 + horizon + width, "one expiry per set: its bucket's end + the horizon"
    assert at(settings, t0 + horizon - 1).claim("track", "task-1", "task-1").state == "done"
    assert at(settings, t0 + horizon - 1).state_of("track", "task-1") == "done"
    # Past the horizon and its bucket, the mark is no longer looked for (and its set expires).
    late = at(settings, t0 + horizon + width + 1).claim("track", "task-1", "task-1")
    assert late.state == "claimed"
    assert Claims(settings).suppressed() == {"track": 1}


def test_a_caller_key_is_suppressed_for_idempotency_retention(settings: Settings, store: redis.Redis) -> None:
    retention = settings.caller_key_retention
    assert retention == settings.idempotency_retention == 7 * 86400
    width = bucket_ms(int(retention * 1000)) / 1000
    t0 = time.time() - retention + 30
    delivered(at(settings, t0), "identify", "signup-7", "task-a")  # a caller key: not the task id
    [mark] = mark_sets(store)
    assert t0 + retention <= store.pexpiretime(mark) / 1000 <= t0 + retention + width
    # Long past a task id's horizon, a new message with the same caller key is still a duplicate.
    assert at(settings, t0 + settings.task_key_retention * 3).claim("identify", "signup-7", "task-b").state == "done"
    assert at(settings, t0 + retention - 1).claim("identify", "signup-7", "task-c").state == "done"
    assert at(settings, t0 + retention + width + 1).claim("identify", "signup-7", "task-d").state == "claimed"


def test_a_task_id_key_and_a_caller_key_equal_to_it_see_each_others_marks(settings: Settings) -> None:
    # A dead letter replayed keeps its first task id as its key, under a new task id: the two
    # kinds name one operation, and each finds the other's mark.
    claims = Claims(settings)
    delivered(claims, "delete", "task-9", "task-9")
    assert claims.claim("delete", "task-9", "replay-1").state == "done"
    delivered(claims, "suppress", "task-8", "replay-2")
    assert claims.claim("suppress", "task-8", "task-8").state == "done"


def test_marks_written_under_other_settings_are_found(settings: Settings, store_url: str) -> None:
    # A rolling change of max_retries or the visibility timeout moves the horizon and the bucket
    # width: every series that wrote to the store is looked up, whatever the reader's settings.
    short = build_settings({"redis_url": store_url, "max_retries": 1, "visibility_timeout": 120}, environ={})
    assert bucket_ms(int(short.task_key_retention * 1000)) != bucket_ms(int(settings.task_key_retention * 1000))
    delivered(Claims(short), "track", "t-short", "t-short")
    delivered(Claims(settings), "track", "t-long", "t-long")
    assert Claims(settings).claim("track", "t-short", "t-short").state == "done"
    assert Claims(short).claim("track", "t-long", "t-long").state == "done"


def test_a_done_mark_of_the_previous_layout_is_still_honoured(settings: Settings, store: redis.Redis) -> None:
    claims = Claims(settings)
    claim_key, _marker = claims.keys_for("track", "old-task")
    store.set(claim_key, "d:old-task", px=60_000)  # written by the version that kept marks there
    assert claims.claim("track", "old-task", "old-task").state == "done"
    assert claims.state_of("track", "old-task") == "done"


def same_shard_keys(claims: Claims, n: int, shard: int, prefix: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        key = f"{prefix}{i}"
        digest = hashlib.sha256(f"track\x00{key}".encode()).digest()
        if int.from_bytes(digest[8:10], "big") % SHARDS == shard:
            out.append(key)
        i += 1
    assert claims.where("track", out[0]).shard == shard
    return out


def test_a_full_set_overflows_into_the_next_level_and_every_mark_is_found(
    settings: Settings, store: redis.Redis
) -> None:
    now = time.time()
    claims = at(settings, now)
    keys = same_shard_keys(claims, 1300, shard=17, prefix="k")
    marked = keys[:1100]
    calls, taken = [], []
    for k in marked:
        call, ckeys, token = claims.claim_call("track", k, k)
        calls.append(call)
        taken.append((ckeys, token))
    answers = run_pipelined(settings, calls)
    run_pipelined(settings, [claims.done_call(Claims.claim_result(a, ckeys, token), k)
                             for a, (ckeys, token), k in zip(answers, taken, marked, strict=True)])
    sets = mark_sets(store)
    assert len(sets) > 2, "1,100 marks of one shard and bucket do not fit one intset"
    assert all(store.object("encoding", s) == b"intset" for s in sets)
    assert all(store.scard(s) <= 512 for s in sets)
    assert sum(store.scard(s) for s in sets) == 1100
    states = run_pipelined(settings, [claims.state_call("track", k) for k in keys])
    assert [Claims.state_result(x) for x in states] == ["done"] * 1100 + [None] * 200
    # Nothing left behind but the marks: no claim, no attempt marker.
    assert [k for k in store.keys("*:idem:*") if store.type(k) == b"string"] == []


def test_damaged_mark_sets_and_series_are_replaced_never_fatal(settings: Settings, store: redis.Redis) -> None:
    claims = Claims(settings)
    delivered(claims, "track", "dmg-1", "dmg-1")
    [mark] = mark_sets(store)
    index = claims.where("track", "dmg-2").index
    store.delete(mark)
    store.set(mark, "not a set")  # a foreign writer
    # The mark was lost with the damage: the operation may go again, the store answers.
    assert claims.claim("track", "dmg-1", "dmg-1").state == "claimed"
    delivered(claims, "track", "dmg-2", "dmg-2")
    store.delete(index)
    store.rpush(index, "x")
    assert claims.claim("track", "dmg-3", "dmg-3").state == "claimed"
    delivered(claims, "track", "dmg-4", "dmg-4")
    assert claims.state_of("track", "dmg-4") == "done"


def test_a_delivery_leaves_nothing_but_its_done_mark(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    n = 30
    ids = [cio_celery.track.delay(f"user-{i}", "ret", {"i": i}).id for i in range(n)]
    cio_celery.identify.apply_async(("user-x",), {"plan": "p"}, idempotency_key="caller-1")
    fake.wait_for_applied(n + 1, timeout=20)
    s = settings_for_app(worker_app)
    claims = Claims(s)
    wait_until(lambda: all(claims.state_of("track", t) == "done" for t in ids), what="every done mark")
    wait_until(lambda: Ledger(s).depth() == 0, what="the ledger to empty")
    assert claims.state_of("identify", "caller-1") == "done"
    strings = [k.decode() for k in store.keys("*:idem:*") if store.type(k) == b"string"]
    assert strings == [], "no claim or attempt marker outlives its delivery"
    sets = mark_sets(store)
    assert sum(store.scard(k) for k in sets) == n + 1
    assert all(store.object("encoding", k) == b"intset" for k in sets)
    series = {k.split(":idem:")[1].split(":")[0] for k in sets}
    task_ms, caller_ms = int(s.task_key_retention * 1000), int(s.caller_key_retention * 1000)
    assert series == {f"{bucket_ms(task_ms)}.{task_ms}", f"{bucket_ms(caller_ms)}.{caller_ms}"}


def test_a_server_with_a_lower_intset_limit_costs_memory_never_a_mark() -> None:
    from cio_celery.testing.redis_server import RedisServer

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("set-max-intset-entries", 64)
        s = build_settings({"redis_url": f"{server.url}/0"}, environ={})
        claims = at(s, time.time())
        keys = same_shard_keys(claims, 400, shard=3, prefix="low")
        calls, taken = [], []
        for k in keys[:300]:
            call, ckeys, token = claims.claim_call("track", k, k)
            calls.append(call)
            taken.append((ckeys, token))
        answers = run_pipelined(s, calls)
        run_pipelined(s, [claims.done_call(Claims.claim_result(a, ckeys, token), k)
                          for a, (ckeys, token), k in zip(answers, taken, keys[:300], strict=True)])
        states = run_pipelined(s, [claims.state_call("track", k) for k in keys])
        assert [Claims.state_result(x) for x in states] == ["done"] * 300 + [None] * 100
        encodings = Counter(client.object("encoding", k) for k in mark_sets(client))
        # The first set went over the server's limit once; the marks after it went deeper.
        assert encodings[b"hashtable"] == 1 and encodings[b"intset"] >= 4, encodings
        client.close()
