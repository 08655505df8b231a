"""The shared breaker against a pure-Python model of its intended semantics.

A Hypothesis state machine drives several simulated worker processes (each its own
:class:`Breaker` on the same Redis and the same explicit clock), interleaving acquire,
record of outstanding permits (stale ones included), lost permits, clock steps and manual
open/close/reset, and compares every answer and every :meth:`Breaker.status` with the
model. A threaded test then checks the half-open probe limit under real concurrency.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cio_celery.breaker import Breaker, Permit
from cio_celery.settings import build_settings

CONSECUTIVE = 3
MINIMUM_CALLS = 4
FAILURE_RATE = 0.5
WINDOW = 10.0
BUCKETS = 10
OPEN_BASE = 5.0
OPEN_MAX = 20.0
K = 2
CLOSE_AFTER = 2
LEASE = 7.0
WORKERS = 4
START = 1_000_000.0


class Clock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Heard:
    """A pybreaker-style listener writing every state change into one shared list."""

    def __init__(self, sink: list[tuple[str, str]]) -> None:
        self.sink = sink

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.sink.append((old_state.name, new_state.name))


def make(store_url: str, clock: Clock | None, seed: int = 1, **overrides: Any) -> Breaker:
    values = {
        "redis_url": store_url, "timeout": 5.0, "breaker_consecutive_failures": CONSECUTIVE,
        "breaker_minimum_calls": MINIMUM_CALLS, "breaker_failure_rate": FAILURE_RATE,
        "breaker_window": WINDOW, "breaker_open_base": OPEN_BASE, "breaker_open_max": OPEN_MAX,
        "breaker_open_jitter": 0.0, "breaker_half_open_probes": K, "breaker_close_after": CLOSE_AFTER,
        "breaker_probe_lease": LEASE,
    }
    values.update(overrides)
    return Breaker(build_settings(values, environ={}), clock=clock, rng=random.Random(seed))


# -- the model -----------------------------------------------------------------------------


@dataclass
class Model:
    """The intended semantics, written plainly; ``now`` is always passed in."""

    state: str = "closed"
    gen: int = 0
    until: float = 0.0
    forced: bool = False
    trips: int = 0
    cons: int = 0
    window: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [calls, failures]
    leases: dict[str, float] = field(default_factory=dict)  # token -> expiry
    successes: int = 0
    # When it last became closed: close() on a breaker already closed does not restart it, since
    # "had been closed for more than 2 * open_max" measures the time spent closed.
    closed_since: float = START
    transitions: list[tuple[str, str]] = field(default_factory=list)

    # helpers

    def _move(self, new: str, now: float) -> None:
        old = self.state
        if old != new:
            self.transitions.append((old, new))
            if new == "closed":
                self.closed_since = now
        self.state = new
        self.gen += 1
        self.leases.clear()
        self.successes = 0

    def _clear_counts(self) -> None:
        self.window.clear()
        self.cons = 0

    def _trip(self, now: float) -> None:
        if self.state == "closed" and now - self.closed_since > 2 * OPEN_MAX:
            self.trips = 0
        self.trips += 1
        self.until = now + min(OPEN_MAX, OPEN_BASE * 2 ** (self.trips - 1))
        self.forced = False
        self._clear_counts()
        self._move("open", now)

    def _purge(self, now: float) -> None:
        for token, expiry in list(self.leases.items()):
            if expiry <= now:
                del self.leases[token]

    def live_probes(self, now: float) -> int:
        return sum(1 for expiry in self.leases.values() if expiry > now)

    def window_counts(self, now: float) -> tuple[int, int]:
        current = math.floor(now / (WINDOW / BUCKETS))
        calls = fails = 0
        for bucket, (c, f) in self.window.items():
            if bucket > current - BUCKETS:
                calls += c
                fails += f
        return calls, fails

    # operations

    def acquire(self, now: float) -> tuple[str, float | None]:
        """The decision and its retry_after (None: any value in (0, LEASE])."""
        if self.state == "closed":
            return "allow", 0.0
        if self.state == "open":
            if self.forced:
                return "reject", -1.0
            if now < self.until:
                return "reject", self.until - now
            self._move("half-open", now)
        self._purge(now)
        if len(self.leases) < K:
            return "probe", 0.0
        return "reject", None

    def granted(self, token: str, now: float) -> None:
        self.leases[token] = now + LEASE

    def record(self, permit: Permit, outcome: str, now: float) -> str:
        if permit.generation != self.gen:
            self.leases.pop(permit.token, None)
            return "stale"
        if self.state == "open":
            return "stale"
        if self.state == "closed":
            if outcome == "ignore":
                return "ok"
            bucket = math.floor(now / (WINDOW / BUCKETS))
            counts = self.window.setdefault(bucket, [0, 0])
            counts[0] += 1
            if outcome == "success":
                self.cons = 0
                return "ok"
            counts[1] += 1
            self.cons += 1
            for old in [b for b in self.window if b <= bucket - BUCKETS]:
                del self.window[old]
            calls, fails = self.window_counts(now)
            if self.cons >= CONSECUTIVE or (calls >= MINIMUM_CALLS and fails >= FAILURE_RATE * calls):
                self._trip(now)
                return "closed>open"
            return "ok"
        # half-open: only a live lease of this generation counts
        expiry = self.leases.pop(permit.token, None) if permit.token else None
        if expiry is None or expiry <= now:
            return "stale"
        if outcome == "ignore":
            return "ok"
        if outcome == "success":
            self.successes += 1
            if self.successes >= CLOSE_AFTER:
                self._clear_counts()
                self._move("closed", now)
                return "half-open>closed"
            return "ok"
        self._trip(now)
        return "half-open>open"

    def force_open(self, now: float) -> None:
        self.forced = True
        self._clear_counts()
        self._move("open", now)

    def force_close(self, now: float) -> None:
        self.forced = False
        self._clear_counts()
        self._move("closed", now)

    def reset(self, now: float) -> None:
        self.force_close(now)
        self.trips = 0


# -- the state machine ---------------------------------------------------------------------

# Outcomes follow a simulated upstream that goes down and comes back, so outages trip the
# breaker and recoveries close it; every outcome stays possible in both phases.
OUTCOMES = {
    True: st.sampled_from(["failure", "failure", "failure", "ignore", "success"]),  # upstream down
    False: st.sampled_from(["success", "success", "success", "ignore", "failure"]),  # upstream up
}
SMALL_STEPS = st.integers(1, 12).map(lambda q: q / 4)  # 0.25 .. 3 s, exact binary fractions
JUMPS = st.sampled_from([LEASE, LEASE + 0.5, OPEN_BASE, OPEN_BASE + 0.25, 2 * OPEN_BASE, OPEN_MAX,
                         2 * OPEN_MAX + 1, WINDOW, WINDOW + 1.5, 100.0])


class BreakerMachine(RuleBasedStateMachine):
    store_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        client = redis.Redis.from_url(self.store_url)
        client.flushdb()
        client.close()
        self.clock = Clock()
        self.heard: list[tuple[str, str]] = []
        self.workers = [make(self.store_url, self.clock, seed=i) for i in range(WORKERS)]
        for b in self.workers:
            b.add_listener(Heard(self.heard))
        self.outstanding: list[list[Permit]] = [[] for _ in range(WORKERS)]
        self.model = Model()
        self.last_gen = 0
        self.upstream_down = False

    @initialize(
        down=st.booleans(),
        start=st.sampled_from(["closed", "open", "half-open", "recovered", "recovered long ago"]),
    )
    def start(self, down: bool, start: str) -> None:
        """Where the upstream and the breaker begin: fresh, just tripped, probing (a probe held by
        worker 0), or closed again after a trip, recently or long enough ago to forget it."""
        self.upstream_down = down
        if start == "closed":
            return
        for _ in range(CONSECUTIVE):
            self._record(0, self._acquire(0), "failure")
        if start == "open":
            return
        self.clock.t = self.model.until
        if start == "half-open":
            self.outstanding[0].append(self._acquire(0))
            return
        for _ in range(CLOSE_AFTER):
            self._record(0, self._acquire(0), "success")
        if start == "recovered long ago":
            self.clock.t += 2 * OPEN_MAX + 1

    @property
    def now(self) -> float:
        return self.clock.t

    def _acquire(self, worker: int) -> Permit:
        state_before = self.model.state + (" by hand" if self.model.forced else "")
        expected, retry_after = self.model.acquire(self.now)
        permit = self.workers[worker].acquire()
        event(f"acquire in {state_before}: {permit.decision}")
        assert permit.decision == expected, (permit, self.model)
        if permit.decision == "allow":
            assert state_before == "closed", state_before
        assert permit.generation == self.model.gen, (permit, self.model)
        if retry_after is None:
            assert 0 < permit.retry_after <= LEASE, permit
        else:
            assert permit.retry_after == pytest.approx(retry_after, abs=1e-6), (permit, retry_after)
        if permit.decision == "probe":
            assert permit.token
            self.model.granted(permit.token, self.now)
        return permit

    def _record(self, worker: int, permit: Permit, outcome: str) -> None:
        if permit.token in self.model.leases and self.model.leases[permit.token] <= self.now:
            event("record of a probe whose lease expired")
        if permit.generation != self.model.gen:
            event("record from an older generation")
        expected = self.model.record(permit, outcome, self.now)
        got = self.workers[worker].record(permit, outcome)  # type: ignore[arg-type]
        event(f"record {outcome}: {got}")
        assert got == expected, (permit, outcome, got, expected, self.model)

    @rule(worker=st.integers(0, WORKERS - 1))
    def acquire(self, worker: int) -> None:
        """Take a permit and hold it: its outcome comes later, or never."""
        self.outstanding[worker].append(self._acquire(worker))

    @rule(workers=st.lists(st.integers(0, WORKERS - 1), min_size=1, max_size=5), data=st.data())
    def calls(self, workers: list[int], data: st.DataObject) -> None:
        """A burst of whole calls, one after the other: acquire, then at once the outcome."""
        for worker in workers:
            permit = self._acquire(worker)
            if permit.allowed:
                self._record(worker, permit, data.draw(OUTCOMES[self.upstream_down], label="outcome"))

    @rule()
    def upstream_flips(self) -> None:
        self.upstream_down = not self.upstream_down

    @precondition(lambda self: any(self.outstanding))
    @rule(
        worker=st.integers(0, WORKERS - 1),
        pick=st.integers(0, 7),
        data=st.data(),
    )
    def record(self, worker: int, pick: int, data: st.DataObject) -> None:
        """The outcome of a held permit (possibly from an older generation, or an expired lease)."""
        worker = self._busy(worker)
        permit = self.outstanding[worker].pop(-1 - pick % len(self.outstanding[worker]))
        self._record(worker, permit, data.draw(OUTCOMES[self.upstream_down], label="outcome"))

    @precondition(lambda self: any(self.outstanding))
    @rule(worker=st.integers(0, WORKERS - 1), pick=st.integers(0, 7))
    def lose_permit(self, worker: int, pick: int) -> None:
        """The worker died holding the permit: its result never arrives."""
        worker = self._busy(worker)
        self.outstanding[worker].pop(-1 - pick % len(self.outstanding[worker]))

    @rule(dt=st.one_of(SMALL_STEPS, JUMPS))
    def tick(self, dt: float) -> None:
        self.clock.t += dt

    @precondition(lambda self: self.model.state == "open" and not self.model.forced)
    @rule(extra=st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    def wait_out_the_open_period(self, extra: float) -> None:
        """Jump to the end of the open period (exactly, or just after)."""
        self.clock.t = max(self.clock.t, self.model.until + extra)

    @precondition(lambda self: self.model.state == "half-open" and bool(self.model.leases))
    @rule(extra=st.sampled_from([0.0, 0.0, 0.25, -0.25]))
    def wait_out_a_lease(self, extra: float) -> None:
        """Jump to the expiry of the oldest probe lease (exactly, just before or just after)."""
        self.clock.t = max(self.clock.t, min(self.model.leases.values()) + extra)

    @rule(worker=st.integers(0, WORKERS - 1), op=st.sampled_from(["open", "close", "reset"]))
    def manual(self, worker: int, op: str) -> None:
        event(f"manual {op}")
        b = self.workers[worker]
        if op == "open":
            b.open()
            self.model.force_open(self.now)
        elif op == "close":
            b.close()
            self.model.force_close(self.now)
        else:
            b.reset()
            self.model.reset(self.now)

    def _busy(self, worker: int) -> int:
        while not self.outstanding[worker]:
            worker = (worker + 1) % WORKERS
        return worker

    @invariant()
    def status_matches_the_model(self) -> None:
        s = self.workers[0].status()
        m = self.model
        calls, fails = m.window_counts(self.now)
        time_left = (-1.0 if m.forced else max(0.0, m.until - self.now)) if m.state == "open" else 0.0
        got = (s.state, s.generation, s.trips, s.consecutive_failures, s.window_calls, s.window_failures,
               s.probes_in_flight)
        want = (m.state, m.gen, m.trips, m.cons, calls, fails, m.live_probes(self.now))
        assert got == want, f"status {got} != model {want} at t={self.now - START}"
        assert s.time_left == pytest.approx(time_left, abs=1e-6), (s, time_left)
        assert s.probes_in_flight <= K
        assert s.generation >= self.last_gen
        self.last_gen = s.generation

    @invariant()
    def listeners_hear_each_transition_once(self) -> None:
        assert self.heard == self.model.transitions


def test_breaker_matches_its_model(store: redis.Redis, store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cio_celery.breaker")  # thousands of transitions: keep the log short
    BreakerMachine.store_url = store_url
    run_state_machine_as_test(
        BreakerMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# -- real concurrency ----------------------------------------------------------------------


def test_concurrent_workers_never_hold_more_than_k_probes(store: redis.Redis, store_url: str) -> None:
    """8 threads hammer a half-open breaker (real Redis TIME): never more than K live probes."""
    b = make(store_url, None, breaker_open_base=0.02, breaker_open_max=0.02, breaker_close_after=10_000,
             breaker_probe_lease=30.0)
    for _ in range(CONSECUTIVE):
        b.record(b.acquire(), "failure")
    assert b.status().state == "open"
    time.sleep(0.05)

    lock = threading.Lock()
    held: dict[int, int] = {}  # generation -> probe permits held right now (a lower bound of live leases)
    worst = {"held": 0, "status": 0, "probes": 0, "allows": 0}
    errors: list[str] = []
    deadline = time.monotonic() + 1.5

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline and not errors:
            permit = b.acquire()
            if permit.decision != "probe":
                if permit.decision == "allow":
                    worst["allows"] += 1
                time.sleep(rng.random() * 0.002)
                continue
            with lock:
                held[permit.generation] = held.get(permit.generation, 0) + 1
                worst["held"] = max(worst["held"], held[permit.generation])
                worst["probes"] += 1
                if held[permit.generation] > K:
                    errors.append(f"{held[permit.generation]} probes held in generation {permit.generation}")
            in_flight = b.status().probes_in_flight
            with lock:
                worst["status"] = max(worst["status"], in_flight)
            if in_flight > K:
                errors.append(f"status reports {in_flight} probes in flight")
            time.sleep(rng.random() * 0.003)
            with lock:  # released before the record, so the count never overstates the leases
                held[permit.generation] -= 1
            b.record(permit, "failure" if rng.random() < 0.1 else rng.choice(["success", "ignore"]))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert worst["allows"] == 0, "allowed a call while never closed"
    assert worst["probes"] > 20 and worst["held"] >= 1
    assert worst["held"] <= K and worst["status"] <= K
