"""The store on a real Redis Cluster: three masters on loopback (cio_celery.testing.redis_cluster).

The breaker, the limiter and every store-wide key share one slot; claims, attempt markers and
done marks spread over the slots of their shards. Scripts of several slots go in one pipelined
call per node; a call marked ``after_others`` (the dead letter's mark on its claim) runs only
after the calls before it succeeded. The single-Redis scenarios of idempotency and batching are
run again here, unchanged, with the store on the cluster (the broker stays a plain Redis).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

import cio_celery
from cio_celery.deadletters import DeadLetters
from cio_celery.guard import Guard
from cio_celery.idempotency import Claims
from cio_celery.ledger import Ledger
from cio_celery.limiter import Limiter
from cio_celery.settings import Settings, build_settings, configure, settings_for_app
from cio_celery.store import ScriptCall, combine, key, redis_for, run_pipelined, run_scripts
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_cluster import RedisClusterServers
from tests import test_batching, test_idempotency
from tests.conftest import RecordingHandler
from tests.helpers import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_servers() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture()
def nodes(cluster_servers: RedisClusterServers) -> Iterator[list[redis.Redis]]:
    clients = [redis.Redis.from_url(u) for u in cluster_servers.node_urls]
    for c in clients:
        c.flushall()
    yield clients
    for c in clients:
        c.close()


@pytest.fixture()
def settings(cluster_servers: RedisClusterServers, nodes: list[redis.Redis]) -> Settings:
    return build_settings({"redis_url": cluster_servers.url, "idempotency_lease": 3.0, "timeout": 2.0},
                          environ={})


@pytest.fixture()
def cluster_app(worker_app: Any, cluster_servers: RedisClusterServers, nodes: list[redis.Redis]) -> Iterator[Any]:
    """The embedded worker with its store on the cluster."""
    configure(worker_app, redis_url=cluster_servers.url)
    yield worker_app
    configure(worker_app)


def node_of(nodes: list[redis.Redis], name: str) -> int:
    """Which master (its index in ``nodes``) holds ``name``, by its slot."""
    slot = key_slot(name.encode())
    ports = [n.connection_pool.connection_kwargs["port"] for n in nodes]
    for start, end, master, *_ in nodes[0].execute_command("CLUSTER SLOTS"):
        if start <= slot <= end:
            return ports.index(int(master[1]))
    raise AssertionError(f"no node serves slot {slot}")


def reads(nodes: list[redis.Redis]) -> list[int]:
    return [int(n.info("stats")["total_reads_processed"]) for n in nodes]


# -- layout ------------------------------------------------------------------------------------


def test_store_wide_keys_share_one_slot_and_claims_spread_over_every_master(
    settings: Settings, nodes: list[redis.Redis]
) -> None:
    assert redis_for(settings).__class__.__name__ == "RedisCluster"
    limiter = Limiter(settings)
    common = [key(settings, "breaker", "customerio"), *limiter._keys("track"), *limiter._keys("transactional"),
              key(settings, "fallback", "ops"), key(settings, "dlq", "items"), key(settings, "ledger"),
              key(settings, "quarantine"), key(settings, "stats")]
    assert len({key_slot(k.encode()) for k in common}) == 1
    claims = Claims(settings)
    per_node = Counter(node_of(nodes, claims.keys_for("track", f"task-{i}")[0]) for i in range(600))
    assert sorted(per_node) == [0, 1, 2]
    assert min(per_node.values()) > 600 / 3 * 0.75, per_node
    claim, marker = claims.keys_for("track", "task-1")
    assert key_slot(claim.encode()) == key_slot(marker.encode())


# -- the claim protocol ------------------------------------------------------------------------


def test_the_claim_protocol_holds_on_a_cluster(settings: Settings) -> None:
    claims = Claims(settings)
    first = claims.claim("track", "k1")
    assert first.state == "claimed"
    second = claims.claim("track", "k1")
    assert second.state == "held" and 2.0 < second.held_for <= 3.0
    assert claims.release(second) is False
    assert claims.release(first) is True
    again = claims.claim("track", "k1")
    assert claims.done(again, "t") is True
    for i in range(40):  # many keys, many shards: the counters are summed over them
        c = claims.claim("identify", f"k-{i}")
        claims.done(c, f"t-{i}")
        assert claims.claim("identify", f"k-{i}").state == "done"
    assert claims.claim("track", "k1").state == "done"
    assert claims.suppressed() == {"identify": 40, "track": 1}
    assert claims.state_of("identify", "k-7") == "done" and claims.state_of("identify", "nope") is None


# -- several slots in one round trip -----------------------------------------------------------

ECHO = "return ARGV[1]"
SET = "redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]"
FAIL = "return redis.error_reply('refused')"


def test_scripts_of_several_slots_answer_in_order_in_one_pipelined_call_per_node(
    settings: Settings, nodes: list[redis.Redis]
) -> None:
    names = [f"{{cio:{i}}}:x" for i in range(12)] + [key(settings, "a"), key(settings, "b")]
    assert len({node_of(nodes, n) for n in names}) == 3
    calls = [ScriptCall(SET, [n], [str(i)]) for i, n in enumerate(names)]
    run_scripts(settings, calls)  # connections made, scripts loaded
    before = reads(nodes)
    assert run_scripts(settings, calls) == [str(i).encode() for i in range(len(names))]
    after = reads(nodes)
    # One read per node for the scripts (the two INFO commands of reads() add one more).
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 2]
    assert run_pipelined(settings, [combine(calls[:3]), calls[3], combine([calls[-2], calls[-1]])]) == [
        [b"0", b"1", b"2"], b"3", [str(len(names) - 2).encode(), str(len(names) - 1).encode()]]


def test_a_call_after_others_runs_only_once_they_succeeded(settings: Settings, nodes: list[redis.Redis]) -> None:
    client = redis_for(settings)
    central = key(settings, "dlq", "items")
    shard = "{cio:7}:idem:mark"
    assert node_of(nodes, central) != node_of(nodes, shard)
    mark = ScriptCall(SET, [shard], ["x"], after_others=True)
    with pytest.raises(redis.ResponseError, match="refused"):
        run_scripts(settings, [ScriptCall(FAIL, [central], []), mark])
    assert client.get(shard) is None, "the mark went without what it must follow"
    assert run_scripts(settings, [ScriptCall(SET, [central], ["letter"]), mark]) == [b"letter", b"x"]
    assert client.get(shard) == b"x"
    client.delete(shard)
    with pytest.raises(redis.ResponseError, match="refused"):
        run_pipelined(settings, [combine([ScriptCall(FAIL, [central], []), mark])])
    assert client.get(shard) is None


def test_a_script_spanning_slots_is_refused_before_it_is_sent(settings: Settings) -> None:
    with pytest.raises(ValueError, match="cluster slots"):
        run_pipelined(settings, [ScriptCall(ECHO, ["{cio:1}:a", "{cio:2}:a"], ["x"])])


# -- the ledger ----------------------------------------------------------------------------------


def test_adaptive_batching_admits_on_a_cluster(cluster_servers: RedisClusterServers,
                                               nodes: list[redis.Redis]) -> None:
    """The admission runs in the common slot without the claim; one that goes alone claims in its
    shard's slot next (and sees a done mark there), one that is coalesced takes no claim (its
    batch will)."""
    s = build_settings({"redis_url": cluster_servers.url, "rate_limit_track": 100.0, "timeout": 2.0}, environ={})
    entry = '{"operation":"track","task_id":"t","args":[],"kwargs":{}}'
    with Guard(s, "track", "key-alone", "task-alone") as alone:
        alone.take(0, entry, behind=False)  # room under the limit, nothing buffered: alone
        assert not alone.coalesced and alone.claim is not None and alone.claim.state == "claimed"
        assert alone.slot is not None and alone.slot.granted
        assert redis_for(s).get(alone.claim.keys[0]) is not None  # held, in its shard's slot
        alone.call(lambda: {})  # delivered: the done mark is written as it settles
    time.sleep(0.05)  # the next rate-limit slot
    with Guard(s, "track", "key-alone", "task-alone") as copy:
        copy.take(0, entry, behind=False)
        assert not copy.coalesced and copy.claim is not None and copy.claim.state == "done"
    with Guard(s, "track", "key-behind", "task-behind") as behind:
        behind.take(0, entry, behind=True)  # waited in its queue past the linger: batched
        assert behind.coalesced and behind.claim is None
    assert redis_for(s).llen(key(s, "coalesce")) == 1


def test_batching_at_enqueue_appends_on_a_cluster(cluster_servers: RedisClusterServers,
                                                   nodes: list[redis.Redis]) -> None:
    """The enqueue script's keys (buffer, its age, arrivals, breaker, drainer lease) share the
    store's common slot: one script on one master, declined without a drainer, appended with one."""
    from cio_celery.coalesce import _plan_for, buffer_at_enqueue

    s = build_settings({"redis_url": cluster_servers.url, "rate_limit_track": 100.0, "timeout": 2.0,
                        "key_prefix": "enq"}, environ={})
    r = redis_for(s)
    now = int(r.time()[0])
    r.hset(key(s, "coalesce", "arrivals"), mapping={str(now + d): 1000 for d in range(-1, 30)})
    args, kwargs = ["user-0", "x", {"seq": 0}, "01JD0000000000000000000000", None], {"_cio": {"key": "k"}}
    assert not buffer_at_enqueue(s, "track", "t-0", args, kwargs)  # no drainer holds the lease
    assert _plan_for(s).not_before - time.monotonic() < 1.0, "declined by the store, not failed"
    r.set(key(s, "coalesce", "drainer"), "worker", px=5000)
    s2 = build_settings({"redis_url": cluster_servers.url, "rate_limit_track": 100.0, "timeout": 2.0,
                         "key_prefix": "enq"}, environ={})  # a new plan: the first waits a tenth of a second
    assert buffer_at_enqueue(s2, "track", "t-1", args, kwargs)
    assert r.llen(key(s, "coalesce")) == 1 and r.get(key(s, "coalesce", "since")) is not None


def test_a_ledger_record_landing_after_the_operation_ended_is_not_written(settings: Settings) -> None:
    claims = Claims(settings)
    ledger = Ledger(settings)
    done = claims.claim("track", "t-done", "t-done")
    claims.done(done, "t-done")
    meta = {"_cio": {"key": "t-done"}}
    ledger.record_now([ledger.record_call("cio_celery.track", "t-done", [], meta, "cio", time.time()),
                       ledger.record_call("cio_celery.track", "t-new", [], {"_cio": {"key": "t-new"}}, "cio",
                                          time.time())])
    assert ledger.depth() == 1
    assert redis_for(settings).hexists(key(settings, "ledger"), "t-new")


# -- the single-Redis scenarios, with the store on the cluster -----------------------------------


def test_the_same_caller_key_twice_is_delivered_once(
    cluster_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    test_idempotency.test_the_same_caller_key_twice_is_delivered_once(cluster_app, fake, all_logs)


def test_a_redelivered_message_with_the_same_task_id_is_delivered_once(
    cluster_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    test_idempotency.test_a_redelivered_message_with_the_same_task_id_is_delivered_once(cluster_app, fake, all_logs)


def test_a_claim_held_by_another_worker_means_later_not_never(
    cluster_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    test_idempotency.test_a_claim_held_by_another_worker_means_later_not_never(cluster_app, fake, all_logs)


def test_a_permanent_failure_is_dead_lettered_and_replayed(cluster_app: Any, fake: FakeCustomerIO) -> None:
    test_idempotency.test_a_permanent_failure_releases_the_claim_so_a_replay_delivers(cluster_app, fake)


def test_a_dead_lettered_message_redelivered_stops_at_its_mark(
    cluster_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    fake.fail_next(1, status=400)
    cio_celery.delete.apply_async(("user-5",), task_id="dead-task-1")
    letters = DeadLetters(settings_for_app(cluster_app), cluster_app)
    wait_until(lambda: letters.count() == 1, what="the dead letter")
    claims = Claims(settings_for_app(cluster_app))
    wait_until(lambda: claims.state_of("delete", "dead-task-1") == "dead", what="its mark, after the letter")
    cio_celery.delete.apply_async(("user-5",), task_id="dead-task-1")  # the same message again
    wait_until(lambda: [r for r in all_logs.records if getattr(r, "cio_event", "") == "duplicate_suppressed"],
               what="the copy to stop")
    assert len(fake.requests) == 1 and letters.count() == 1


def test_a_backlog_drains_in_batches_each_applied_once(cluster_app: Any, fake: FakeCustomerIO) -> None:
    test_batching.test_a_backlog_goes_in_few_requests_each_applied_once(cluster_app, fake)


def test_batch_items_already_delivered_are_not_sent_again(cluster_app: Any, fake: FakeCustomerIO) -> None:
    test_batching.test_items_already_delivered_are_not_sent_again(cluster_app, fake)


def test_a_207_dead_letters_only_the_failed_items(cluster_app: Any, fake: FakeCustomerIO) -> None:
    test_batching.test_a_207_dead_letters_only_the_failed_items(cluster_app, fake)


def test_an_open_breaker_parks_the_batch_again(cluster_app: Any, fake: FakeCustomerIO) -> None:
    test_batching.test_an_open_breaker_parks_the_batch_again(cluster_app, fake)


def test_health_reads_a_cluster_store(cluster_app: Any, fake: FakeCustomerIO) -> None:
    from cio_celery.health import health_report

    cio_celery.identify.apply_async(("user-h",), {"plan": "x"}, idempotency_key="health-1")
    cio_celery.identify.apply_async(("user-h",), {"plan": "x"}, idempotency_key="health-1")
    fake.wait_for_applied(1)
    claims = Claims(settings_for_app(cluster_app))
    wait_until(lambda: claims.suppressed().get("identify") == 1, what="the duplicate to be counted")
    report = health_report(cluster_app)
    names = [p.name for p in report.problems]
    assert [n for n in names if "store" in n or "unreadable" in n] == [], report.as_dict()
    assert report.suppressed_duplicates == {"identify": 1}
