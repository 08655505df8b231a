"""Adaptive batching through real worker processes: alone below the rate limit, in
``/api/v2/batch`` requests past it, each operation applied once either way."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish
from kombu.exceptions import OperationalError

from cio_celery.coalesce import _BUFFER_LUA, in_flight_key
from cio_celery.fallback import Fallback
from cio_celery.health import batching_figures
from cio_celery.idempotency import Claims
from cio_celery.ledger import Ledger
from cio_celery.settings import build_settings, settings_for_app
from cio_celery.store import redis_for
from cio_celery.testing import FakeCustomerIO
from tests.chaos_harness import Cluster, chaos_cluster, wait_all_applied

pytestmark = [pytest.mark.slow]

LIMITED = {"CIO_RATE_LIMIT_TRACK": "100", "CIO_BATCH_LINGER": "0.1", "CIO_BATCH_MIN_SIZE": "20"}
LIMITED_MIN_SIZE = 20


def by_kind(fake: FakeCustomerIO) -> Counter[str]:
    return Counter("batch" if r.operation == "batch" else "single" for r in fake.requests)


def test_below_the_limit_every_operation_goes_alone() -> None:
    # A linger of 0.5 s: on a loaded test machine a message can wait 0.1 s in its queue, which
    # would count as a backlog (and rightly be batched).
    with chaos_cluster(workers=1, concurrency=2, **{**LIMITED, "CIO_BATCH_LINGER": "0.5"}) as c:
        c.fake.set_latency(0.01)
        track = c.task("track")
        for i in range(40):
            track.delay(f"user-{i}", "light", {"seq": i})
            time.sleep(0.05)  # 20/s, a fifth of the limit
        wait_all_applied(c, 40, timeout=30)
        assert by_kind(c.fake) == {"single": 40}


def test_past_the_limit_operations_leave_in_batches_each_applied_once() -> None:
    n = 1500
    with chaos_cluster(workers=1, concurrency=4, **LIMITED) as c:
        c.fake.set_latency(0.03)
        started = time.monotonic()
        # Read while the operations arrive: the drainer may empty the buffer as soon as they stop.
        with ThreadPoolExecutor(1) as pool:
            snapshot = pool.submit(_buffer_snapshot, c, 60.0)
            c.enqueue_track(n)
            held = snapshot.result()
        took = wait_all_applied(c, n, timeout=120)
        time.sleep(1.0)
        applied = c.applied()
        assert sorted(applied) == list(range(n)) and max(applied.values()) == 1
        kinds = by_kind(c.fake)
        batch_items = sum(len(r.json["batch"]) for r in c.fake.requests if r.operation == "batch")
        assert kinds["batch"] >= 1
        assert batch_items >= n * 0.8, f"most operations went in batches: {kinds}, {batch_items} batch items"
        # The buffer's byte count (its cap's measure) is what it held, and nothing once drained.
        assert held is not None, "the buffer was seen holding operations"
        assert held[0] == held[1] > 0, held
        store = redis_for(settings_for_app(c.producer))
        assert int(store.get("{cio}:coalesce:bytes") or 0) == 0 and store.llen("{cio}:coalesce") == 0
        # batch_min_size 20: a batch leaves smaller only when the linger ended first.
        assert batch_items / kinds["batch"] >= 10, "operations per batch request"
        assert len(c.fake.requests) < n / 10
        settings = settings_for_app(c.producer)
        assert Ledger(settings).depth() == 0, "every batched operation left the ledger"
        figures = batching_figures(settings)  # what cio status and Prometheus show
        assert figures["batched"] == batch_items and figures["batch_requests"] == kinds["batch"]
        assert figures["single"] == kinds["single"] and figures["buffer"] == 0
        print(f"\n{n} track past the limit: {kinds}, {batch_items} operations in batches, "
              f"{batch_items / kinds['batch']:.0f} per batch, {n / (time.monotonic() - started):.0f} ops/s, "
              f"all applied {took:.1f} s after the enqueue")


def _buffer_entry(i: int) -> bytes:
    """A batching buffer entry as the admission writes it: a track operation with its metadata."""
    return json.dumps({"operation": "track", "task_id": f"t-{i}", "kwargs": {"_cio": {"key": f"k-{i}"}},
                       "args": [f"user-{i}", "x", {"seq": i}, f"01JD00000000000000000000{i:02d}", None]}).encode()


def _buffer_snapshot(c: Cluster, timeout: float = 10.0) -> tuple[int, int] | None:
    """(bytes the buffer holds, its byte count), read atomically while it holds something."""
    # The package's own client: the store may be a Redis Cluster (test_chaos_cluster runs this
    # scenario there); both keys share the {cio} slot, so one script reads them atomically.
    store = redis_for(settings_for_app(c.producer))
    read = "return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('GET', KEYS[2])}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries, count = store.eval(read, 2, "{cio}:coalesce", "{cio}:coalesce:bytes")
        if entries:
            return sum(len(e) for e in entries), int(count or 0)
        time.sleep(0.005)
    return None


def test_at_most_batch_max_in_flight_batches_are_delivered_at_once() -> None:
    # Customer.io taking 0.3 s a request: with one batch in flight at most, a batch request starts
    # only after the one before was answered; the buffer grows meanwhile (bigger batches).
    n = 1200
    with chaos_cluster(workers=1, concurrency=4, CIO_BATCH_MAX_IN_FLIGHT="1", **LIMITED) as c:
        c.fake.set_latency(0.3)
        c.enqueue_track(n)
        wait_all_applied(c, n, timeout=120)
        time.sleep(0.5)
        applied = c.applied()
        assert sorted(applied) == list(range(n)) and max(applied.values()) == 1
        batches = sorted((r.received_at, len(r.json["batch"])) for r in c.fake.requests if r.operation == "batch")
        assert len(batches) >= 3
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(batches)]
        assert min(gaps) >= 0.29, f"batch requests overlapped: gaps {gaps}"
        assert max(size for _t, size in batches) > LIMITED_MIN_SIZE, "the buffer grew while a batch flew"
        settings = settings_for_app(c.producer)
        assert redis_for(settings).zcard(in_flight_key(settings)) == 0, "every batch's end was recorded"


def every_batchable_operation(c: Cluster, i: int) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    return [
        ("identify", (f"user-{i}",), {"seq": i, "plan": "pro"}),
        ("track", (f"user-{i}", "ev", {"seq": i}), {}),
        ("track_anonymous", (f"anon-{i}", "anon_ev", {"seq": i}), {}),
        ("pageview", (f"user-{i}", f"/p/{i}"), {"seq": i}),
        ("add_device", (f"user-{i}", f"tok-{i}", "ios"), {"last_used": 1700000000, "seq": i}),
        ("delete_device", (f"user-{i}", f"old-{i}"), {}),
        ("merge_customers", ("id", f"user-{i}", "email", f"m{i}@example.com"), {}),
        ("suppress", (f"sup-{i}",), {}),
        ("unsuppress", (f"sup-{i}",), {}),
        ("delete", (f"gone-{i}",), {}),
    ]


def test_every_batchable_operation_is_converted_and_applied_once_in_a_burst() -> None:
    rounds = 30
    with chaos_cluster(workers=1, concurrency=4, **LIMITED) as c:
        c.fake.set_latency(0.03)
        for i in range(rounds):
            for op, args, kwargs in every_batchable_operation(c, i):
                c.task(op).apply_async(args, kwargs)
        expected = rounds * 10
        deadline = time.monotonic() + 90
        while len(c.fake.applied) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        ops = Counter(a.operation.removeprefix("batch:") for a in c.fake.applied)
        assert sum(ops.values()) == expected, ops
        # Each operation's v2 action, rounds of each; merges and devices included.
        assert ops["identify"] == rounds and ops["merge"] + ops["merge_customers"] == rounds
        assert ops["add_device"] == rounds and ops["delete_device"] == rounds
        assert ops["event"] + ops["track"] + ops["track_anonymous"] == 2 * rounds
        assert by_kind(c.fake)["batch"] >= 1
        assert not [r for r in c.fake.requests if r.status == 207], "every v2 item was valid"
        assert c.dead_letters().count() == 0
        claims = Claims(settings_for_app(c.producer))
        assert claims.suppressed() == {}


def test_an_operation_too_big_for_a_batch_goes_alone_once() -> None:
    with chaos_cluster(workers=1, concurrency=2, **LIMITED) as c:
        c.fake.set_latency(0.03)
        track = c.task("track")
        blob = "x" * 33_000  # over the 32 KB a batch item may weigh, under the 100 KB of an event
        for i in range(300):
            track.delay(f"user-{i}", "burst", {"seq": i, **({"blob": blob} if i == 150 else {})})
        wait_all_applied(c, 300, timeout=90)
        time.sleep(1.0)
        alone = [r for r in c.fake.requests if r.operation == "track" and (r.json or {}).get("data", {}).get("blob")]
        assert len(alone) == 1, "published alone once, never coalesced again"
        assert max(c.applied().values()) == 1


def test_the_arrivals_count_keeps_two_seconds_whatever_the_gaps(store: redis.Redis) -> None:
    # The buffer's bookkeeping, run as the admission and the callers' append run it (one Lua
    # fragment), with explicit seconds: arrivals every 3 s for an hour must not leave a field a gap.
    script = store.register_script(
        _BUFFER_LUA + "count_arrival(KEYS[1], tonumber(ARGV[1])); return arrived_before(KEYS[1], tonumber(ARGV[2]))"
    )
    arrivals = "{cio}:coalesce:arrivals"
    for sec in range(1_000_000, 1_003_600, 3):
        script(keys=[arrivals], args=[sec, sec])
    assert store.hlen(arrivals) == 1
    script(keys=[arrivals], args=[2_000_000, 2_000_000])
    script(keys=[arrivals], args=[2_000_000, 2_000_000])
    assert script(keys=[arrivals], args=[2_000_001, 2_000_001]) == 2  # the second before counted
    assert sorted(store.hkeys(arrivals)) == [b"2000000", b"2000001"]
    assert 0 < store.ttl(arrivals) <= 5


def test_a_batch_whose_publish_fails_frees_its_in_flight_place_and_stays_in_the_buffer(
    store_url: str, store: redis.Redis
) -> None:
    # A buffer of three operations, a cap of one batch in flight, and a producer whose broker
    # refuses connections: the publish fails after the batch took its place in the set.
    s = build_settings({"redis_url": store_url, "key_prefix": "pubfail", "batch_max_in_flight": 1}, environ={})
    raws = [_buffer_entry(i).decode() for i in range(3)]
    store.rpush("{pubfail}:coalesce", *raws)
    store.set("{pubfail}:coalesce:bytes", sum(len(r) for r in raws))
    dead = Celery("pubfail-dead", broker="redis://127.0.0.1:1/0", set_as_current=False)
    dead.conf.update(task_publish_retry=False, broker_connection_timeout=0.5, broker_connection_retry=False)
    with pytest.raises(OperationalError):
        Fallback(s, dead, buffer="coalesce").release(10, batch=True, counted=True, max_batches=1)
    assert store.zcard(in_flight_key(s)) == 0, "a batch never published holds no place"
    assert store.lrange("{pubfail}:coalesce", 0, -1) == [r.encode() for r in raws], "nothing left the buffer"
    assert int(store.get("{pubfail}:coalesce:bytes") or 0) == sum(len(r) for r in raws)
    # The next tick's publish goes through: one place taken (until its task ends), the buffer empty.
    live = Celery("pubfail-live", broker=store_url, set_as_current=False)
    assert Fallback(s, live, buffer="coalesce").release(10, batch=True, counted=True, max_batches=1) == 3
    assert store.zcard(in_flight_key(s)) == 1
    assert store.llen("{pubfail}:coalesce") == 0 and int(store.get("{pubfail}:coalesce:bytes") or 0) == 0


@pytest.mark.parametrize("arrivals", ["new operations", "the first one parked again, then new ones"])
def test_two_releasers_that_read_the_same_head_lose_nothing(store_url: str, store: redis.Redis, arrivals: str) -> None:
    # A drainer's lease can run out during a slow publish, and another drainer (or
    # `cio fallback release`) then reads the same head. Here the other one runs in full while the
    # first publishes (Celery's before_task_publish signal), and operations arrive. Before, the
    # first trimmed six more from the head by count: the new ones, never published. Checking the
    # head alone is not enough: an entry parked again after its release (the breaker reopened)
    # can be the same bytes as the one read first.
    s = build_settings({"redis_url": store_url, "key_prefix": "overlap"}, environ={})
    buffer, count = "{overlap}:coalesce", "{overlap}:coalesce:bytes"

    first = [_buffer_entry(i) for i in range(6)]
    later = [_buffer_entry(i) for i in range(6, 12)] if arrivals == "new operations" else \
        [first[0]] + [_buffer_entry(i) for i in range(6, 11)]
    store.rpush(buffer, *first)
    store.set(count, sum(len(e) for e in first))
    app = Celery("overlap", broker=store_url, set_as_current=False)
    other = Fallback(s, app, buffer="coalesce")
    started: list[bool] = []
    ran: list[int] = []

    def meanwhile(sender: Any = None, **_: Any) -> None:
        if started or sender != "cio_celery.deliver_batch":  # the other release's own publish
            return
        started.append(True)
        ran.append(other.release(10, batch=True))
        store.rpush(buffer, *later)
        store.incrby(count, sum(len(e) for e in later))

    before_task_publish.connect(meanwhile, weak=False)
    try:
        done = Fallback(s, app, buffer="coalesce").release(10, batch=True)
    finally:
        before_task_publish.disconnect(meanwhile)
    assert ran == [6]
    assert done == 0, "the head it read was gone: it removed nothing"
    assert store.lrange(buffer, 0, -1) == later
    assert int(store.get(count) or 0) == sum(len(e) for e in later)
    assert store.llen("cio.fallback") == 2  # the first six published twice: their claims make it once
