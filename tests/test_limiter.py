"""The cluster-wide rate limiter: GCRA in one Lua script, shared by every process, paused by a 429."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import redis

from cio_celery.limiter import Limiter, bucket_of
from cio_celery.settings import Settings
from tests.chaos_harness import chaos_cluster, wait_all_applied


def limiter(store_url: str, **changes: Any) -> Limiter:
    return Limiter(Settings(redis_url=store_url, **changes))


def test_buckets() -> None:
    assert bucket_of("track") == "track" and bucket_of("identify") == "track" and bucket_of("batch") == "track"
    assert bucket_of("send_email") == "transactional" and bucket_of("send_sms") == "transactional"


def test_slots_are_spaced_by_the_rate(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url, rate_limit_track=10.0, rate_limit_headroom=0.0, rate_limit_max_sleep=0.5)
    first = lim.acquire("track")
    assert first.granted and first.wait == 0
    # The next slot is 0.1 s later: reserved, the worker sleeps that long.
    second = lim.acquire("track")
    assert second.granted and 0.08 < second.wait <= 0.1
    third = lim.acquire("track")
    assert third.granted and 0.18 < third.wait <= 0.2
    # Transactional sends have a bucket of their own.
    assert lim.acquire("transactional").wait == 0


def test_a_long_wait_reserves_a_slot_of_its_own(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url, rate_limit_track=10.0, rate_limit_headroom=0.0, rate_limit_max_sleep=0.05)
    assert lim.acquire("track").granted
    first = lim.acquire("track")
    assert not first.granted and 0.08 < first.wait <= 0.1 and first.reserved
    second = lim.acquire("track")
    # Each refused asker holds its own slot: the next one is one interval later, no herd.
    assert not second.granted and 0.18 < second.wait <= 0.2
    assert abs((second.reserved - first.reserved) - 100_000) < 5_000
    # Too early with the held slot: still refused (and a new slot reserved); on time: granted.
    time.sleep(first.wait)
    on_time = lim.acquire("track", held=first.reserved)
    assert on_time.granted and on_time.wait <= 0.05
    # A held slot long past is not honoured: the asker queues again.
    stale = lim.acquire("track", held=first.reserved - 5_000_000)
    assert not stale.granted or stale.wait > 0


def test_a_pause_replaces_held_slots(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url, rate_limit_track=10.0, rate_limit_headroom=0.0, rate_limit_max_sleep=0.05)
    assert lim.acquire("track").granted
    held = lim.acquire("track")
    lim.pause("track", 0.5)
    time.sleep(held.wait)
    again = lim.acquire("track", held=held.reserved)
    assert not again.granted and again.wait > 0.3  # a new slot, after the pause


def test_burst_and_headroom(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url, rate_limit_track=100.0, rate_limit_headroom=0.5, rate_limit_burst=3,
                  rate_limit_max_sleep=0.0)
    assert lim.rate_of("track") == 50.0
    grants = [lim.acquire("track").granted for _ in range(5)]
    assert grants == [True, True, True, False, False]


def test_zero_means_no_limit(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url, rate_limit_track=0.0)
    assert lim.acquire_call("track") is None
    assert all(lim.acquire("track").granted for _ in range(100))


def test_a_429_pauses_every_worker(store: redis.Redis, store_url: str) -> None:
    lim = limiter(store_url)
    assert lim.acquire("track").granted
    lim.pause("track", 0.6)
    other = limiter(store_url)  # another worker: the pause is in Redis
    slot = other.acquire("track")
    assert not slot.granted and 0.5 < slot.wait <= 0.6
    lim.pause("track", 0.1)  # a shorter pause never shortens the current one
    assert other.acquire("track").wait > 0.4
    assert other.acquire("transactional").granted


def test_a_pause_is_cut_to_retry_after_max(store: redis.Redis, store_url: str) -> None:
    # A 429 whose Retry-After says 30 days (a proxy's, a bad date) pauses the bucket for
    # retry_after_max at most, not for 30 days.
    lim = limiter(store_url, retry_after_max=5.0)
    lim.pause("track", 30 * 86400.0)
    pause_key = lim._keys("track")[1]
    assert 0 < store.pttl(pause_key) <= 6_000
    slot = lim.acquire("track")
    assert not slot.granted and 4.0 < slot.wait <= 5.0
    lim.pause("transactional", float("inf"))
    assert 0 < store.pttl(lim._keys("transactional")[1]) <= 6_000


def _hammer(store_url: str, ready: Any, go: Any, start_at: Any, seconds: float, out: Any) -> None:
    """Ask as a task does: take a grant, or wait for the reserved slot and present it."""
    lim = limiter(store_url, rate_limit_track=50.0, rate_limit_headroom=0.0, rate_limit_max_sleep=0.0)
    lim.acquire("transactional")  # connected and the script loaded before the window opens
    ready.put(1)
    go.wait(60)
    granted = 0
    held = 0
    while time.time() < start_at.value + seconds:
        answer = lim.acquire("track", held)
        if answer.granted:
            granted += 1
            held = 0
        else:
            held = answer.reserved
        time.sleep(answer.wait)
    out.put(granted)


def test_processes_share_one_rate(store: redis.Redis, store_url: str) -> None:
    """Four processes asking as fast as they can get 50/s between them, not 50/s each."""
    ctx = mp.get_context("spawn")
    out, ready, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    seconds = 2.0
    procs = [ctx.Process(target=_hammer, args=(store_url, ready, go, start_at, seconds, out)) for _ in range(4)]
    for p in procs:
        p.start()
    # The window opens once all four have imported and connected: a fixed head start was not
    # enough on a loaded CI machine (the processes began 0.6 s into a 2 s window, and got 69).
    for _ in procs:
        ready.get(timeout=60)
    start_at.value = time.time()
    go.set()
    total = sum(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    # GCRA: one slot per 20 ms, plus the first one; alone, one process gets thousands of answers.
    assert 50 * seconds - 5 <= total <= 50 * seconds + 1, total


@pytest.mark.slow
def test_four_worker_processes_stay_under_100_per_second_at_customerio() -> None:
    """The limit at 100/s, one prefork worker with 4 processes, 1,500 track operations, one
    request each (adaptive batching off: tests/test_coalesce.py covers the batched path)."""
    n = 1500
    with chaos_cluster(workers=1, concurrency=4, CIO_RATE_LIMIT_TRACK="100", CIO_BATCH_COALESCE="0") as c:
        c.enqueue_track(n)
        wait_all_applied(c, n, timeout=120)
        times = sorted(r.received_at for r in c.fake.requests)
    # The most requests in any 1 s window (sliding, starting at each request).
    peak, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        peak = max(peak, i - j + 1)
    sustained = (len(times) - 1) / (times[-1] - times[0])
    print(f"\nrate limit 100/s, 4 processes: {len(times)} requests, peak 1 s window {peak}, "
          f"sustained {sustained:.1f}/s")
    assert peak <= 100
    # How close the cluster gets to the limit is a throughput figure (benchmarks/); here only
    # that the limiter does not starve the workers (it measured 95/s on a quiet machine, 80/s on
    # one running three other test suites).
    assert sustained >= 50
