"""The shared breaker's decisions, each one Lua script, driven with an explicit clock."""

from __future__ import annotations

import random
from typing import Any

import pybreaker
import pytest
import redis

from cio_celery.breaker import Breaker
from cio_celery.exceptions import CircuitOpenError
from cio_celery.settings import build_settings


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.failures = 0
        self.successes = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append((old_state.name, new_state.name))

    def failure(self, cb: Any, exc: Any) -> None:
        self.failures += 1

    def success(self, cb: Any) -> None:
        self.successes += 1


def make(store_url: str, clock: Clock, **overrides: Any) -> Breaker:
    values = {
        "redis_url": store_url, "breaker_consecutive_failures": 5, "breaker_minimum_calls": 10,
        "breaker_failure_rate": 0.5, "breaker_window": 10.0, "breaker_open_base": 10.0,
        "breaker_open_max": 80.0, "breaker_open_jitter": 0.0, "breaker_half_open_probes": 2,
        "breaker_close_after": 2, "breaker_probe_lease": 30.0,
    }
    values.update(overrides)
    return Breaker(build_settings(values, environ={}), clock=clock, rng=random.Random(1))


def fail(b: Breaker, n: int = 1) -> list[str]:
    return [b.record(b.acquire(), "failure") for _ in range(n)]


def succeed(b: Breaker, n: int = 1) -> list[str]:
    return [b.record(b.acquire(), "success") for _ in range(n)]


def test_consecutive_failures_trip_it(store: redis.Redis, store_url: str) -> None:
    b = make(store_url, Clock())
    assert fail(b, 4) == ["ok"] * 4
    assert fail(b) == ["closed>open"]
    st = b.status()
    assert st.state == "open" and st.time_left == 10.0 and st.trips == 1


def test_a_success_breaks_the_run_but_not_the_rate(store: redis.Redis, store_url: str) -> None:
    b = make(store_url, Clock(), breaker_consecutive_failures=100)
    for _ in range(4):
        fail(b, 1)
        succeed(b, 1)
    assert b.status().state == "closed"  # 4 of 8: below the minimum of 10 calls
    fail(b, 1)
    assert b.status().state == "closed"  # 5 of 9
    assert fail(b, 1) == ["closed>open"]  # 6 of 10 >= 50%


def test_failures_older_than_the_window_do_not_count(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock, breaker_consecutive_failures=100)
    fail(b, 9)
    clock.t += 30
    succeed(b, 9)
    assert fail(b, 1) == ["ok"]  # 1 of 10 in the window
    assert b.status().window_calls == 10


def test_a_long_run_of_successes_keeps_the_window_to_its_buckets(store: redis.Redis, store_url: str) -> None:
    # Successes on a closed breaker take the short path (no full check); the window must still
    # drop the buckets that left it, or a day of successes would grow it by a field a second.
    clock = Clock()
    b = make(store_url, clock, breaker_consecutive_failures=100)
    window = b._keys3[2]
    for _ in range(600):
        succeed(b, 1)
        clock.t += 0.5
    assert store.hlen(window) == 10  # the window's 10 buckets of 1 s (the current one of them)
    assert 0 < store.pttl(window) <= 11_000
    st = b.status()
    assert st.window_calls == 18 and st.window_failures == 0  # 2 a second in the 9 s before this one
    assert fail(b, 1) == ["ok"]
    assert b.status().window_calls == 19 and b.status().window_failures == 1


def test_buckets_of_a_shorter_window_do_not_stay_after_it_is_raised(store: redis.Redis, store_url: str) -> None:
    # Failures counted in 1 s buckets (window 10 s); then the window is raised to 60 s (6 s
    # buckets): the old fields' numbers are past the new current bucket and must not count.
    clock = Clock()
    short = make(store_url, clock, breaker_consecutive_failures=100)
    fail(short, 8)
    long = make(store_url, clock, breaker_window=60.0, breaker_consecutive_failures=100)
    clock.t += 6
    assert long.status().window_failures == 0
    succeed(long, 1)  # a new bucket: the stale ones go
    assert all(int(f[1:]) <= int(clock.t / 6) for f in store.hkeys(long._keys3[2]))
    assert fail(long, 4) == ["ok"] * 4  # 4 of 5: under the minimum of 10 calls
    assert long.status().window_calls == 5 and long.status().window_failures == 4


def test_a_success_on_a_damaged_window_takes_the_full_path(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock)
    succeed(b, 1)
    window = b._keys3[2]
    field = f"c{int(clock.t)}"  # 1 s buckets
    for bad in ("not a number", "1.5", "1e3"):  # HINCRBY refuses all three
        store.hset(window, field, bad)
        assert succeed(b, 1) == ["ok"]
        assert store.hget(window, field) == b"1"  # the bad field was dropped, this call counted
    store.hset(b._keys3[0], "cons", "x")  # a run of failures that does not read: the full check
    assert succeed(b, 1) == ["corrupt>closed"]
    store.delete(window)
    store.set(window, "a string")  # a key of another type
    assert succeed(b, 1) == ["corrupt>closed"]
    assert store.type(window) in (b"hash", b"none")
    assert succeed(b, 1) == ["ok"]


def test_ignored_outcomes_do_not_trip_it(store: redis.Redis, store_url: str) -> None:
    b = make(store_url, Clock())
    for _ in range(50):
        b.record(b.acquire(), "ignore")
    assert b.status().state == "closed" and b.status().window_calls == 0


def test_open_rejects_with_the_time_left(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock)
    fail(b, 5)
    clock.t += 4
    permit = b.acquire()
    assert permit.decision == "reject" and permit.retry_after == pytest.approx(6.0)
    with pytest.raises(CircuitOpenError) as info:
        b.call(lambda: 1)
    assert isinstance(info.value, pybreaker.CircuitBreakerError)


def test_half_open_allows_k_probes_then_closes_after_a_run_of_successes(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    rec = Recorder()
    b = make(store_url, clock, breaker_close_after=2)
    b.add_listener(rec)
    fail(b, 5)
    clock.t += 10
    p1, p2, p3 = b.acquire(), b.acquire(), b.acquire()
    assert [p.decision for p in (p1, p2, p3)] == ["probe", "probe", "reject"]
    assert b.record(p1, "success") == "ok"
    assert b.record(p2, "success") == "half-open>closed"
    assert b.acquire().decision == "allow"
    assert rec.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_a_failed_probe_reopens_for_longer(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock)
    fail(b, 5)
    for expected in (20.0, 40.0, 80.0, 80.0):
        clock.t += 100
        p = b.acquire()
        assert p.decision == "probe"
        assert b.record(p, "failure") == "half-open>open"
        assert b.status().time_left == expected


def test_open_period_jitter_stays_within_its_fraction(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock, breaker_open_jitter=0.5)
    fail(b, 5)
    assert 10.0 <= b.status().time_left <= 15.0


def test_an_expired_probe_lease_frees_its_slot(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock)
    fail(b, 5)
    clock.t += 10
    lost1, lost2 = b.acquire(), b.acquire()  # two workers killed while probing
    assert b.acquire().decision == "reject"
    clock.t += 31
    fresh = b.acquire()
    assert fresh.decision == "probe"
    assert b.record(lost1, "success") == "stale", "a result from an expired lease is ignored"
    assert b.status().probes_in_flight == 1
    del lost2


def test_a_result_from_an_older_generation_is_ignored(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    b = make(store_url, clock)
    early = b.acquire()  # taken while closed, answered after the breaker moved on
    fail(b, 5)
    assert b.record(early, "success") == "stale"
    assert b.status().state == "open"


def test_manual_open_close_and_reset(store: redis.Redis, store_url: str) -> None:
    clock = Clock()
    rec = Recorder()
    b = make(store_url, clock)
    b.add_listener(rec)
    b.open()
    clock.t += 10_000
    assert b.acquire().decision == "reject"
    assert b.status().time_left == -1
    b.close()
    assert b.acquire().decision == "allow"
    fail(b, 5)
    gen = b.status().generation
    b.reset()
    st = b.status()
    assert st.state == "closed" and st.trips == 0 and st.generation > gen
    b.open(duration=3)
    clock.t += 3
    assert b.acquire().decision == "probe"
    assert rec.changes[:2] == [("closed", "open"), ("open", "closed")]


def test_listeners_hear_failures_and_successes_and_a_bad_listener_is_harmless(
    store: redis.Redis, store_url: str
) -> None:
    class Broken(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def success(self, cb: Any) -> None:
            raise RuntimeError("boom")

    rec = Recorder()
    b = make(store_url, Clock())
    b.add_listener(Broken())
    b.add_listener(rec)
    assert b.call(lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    assert (rec.successes, rec.failures) == (1, 1)


def test_slow_calls_count_as_failures_when_enabled(store: redis.Redis, store_url: str) -> None:
    b = make(store_url, Clock(), breaker_slow_call=2.0, breaker_consecutive_failures=2)
    b.record(b.acquire(), "success", duration=2.5)
    assert b.record(b.acquire(), "success", duration=3.0) == "closed>open"


def test_keys_share_one_hash_tag(store: redis.Redis, store_url: str) -> None:
    b = make(store_url, Clock())
    fail(b, 5)
    keys = [k.decode() for k in store.keys("*")]
    assert keys and all(k.startswith("{cio}:breaker:customerio") for k in keys)
