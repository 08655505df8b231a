"""Chaos suite on RabbitMQ: the test's own RabbitMQ node as broker, a separate Redis store (AOF on),
real prefork workers with ``recommended_celery_config(transport="amqp")``, the fake Customer.io.

The SIGKILL, broker-restart and outage scenarios of tests/test_chaos.py, shorter (fewer
operations: CI time) and with RabbitMQ's own failures: a pool process and a whole worker killed,
the node stopped cleanly and SIGKILLed under load, the node down while the app enqueues, the
store down, Customer.io down. Each asserts every ``seq`` applied once (events that the fake, like
Customer.io, drops by id are counted, not applied), no dead letter, no worker crash, and reports
its figures (tests/chaos_harness.py ``report``). Skipped without ``rabbitmq-server``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cio_celery.breaker import Breaker
from cio_celery.settings import settings_for_app
from cio_celery.spool import spool_depth
from tests.chaos_harness import Cluster, chaos_cluster, report, wait_all_applied
from tests.rabbitmq import RabbitMQNode, skip_without_rabbitmq

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitMQNode]:
    """One node for the module (3-5 s to start); each scenario deletes the queues it used."""
    skip_without_rabbitmq()
    with RabbitMQNode() as rabbitmq:
        yield rabbitmq


def stream(c: Cluster, n_events: int, seconds: float, n_identify: int = 0) -> threading.Thread:
    """Enqueue ``n_events`` events (and ``n_identify`` identifies) evenly over ``seconds``, in a
    thread: a fault injected meanwhile meets deliveries in flight, whatever path they take."""

    def enqueue() -> None:
        t0 = time.monotonic()
        for i in range(n_events):
            c.task_ids[i] = c.task("track").delay(f"user-{i % 97}", "chaos", {"seq": i}).id
            if i < n_identify:
                c.task("identify").delay(f"user-{i}", seq=i)
            time.sleep(max(0.0, t0 + seconds * (i + 1) / n_events - time.monotonic()))

    thread = threading.Thread(target=enqueue, name="chaos-producer")
    thread.start()
    return thread


def wait_applied_count(c: Cluster, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(c.fake.applied) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def assert_each_applied_once(c: Cluster, n: int, operation: str = "track") -> None:
    applied = c.applied(operation)
    assert sorted(applied) == list(range(n)), f"missing {sorted(set(range(n)) - set(applied))[:20]}"
    assert max(applied.values()) == 1, f"applied twice: {[s for s, k in applied.items() if k > 1][:20]}"
    assert c.dead_letters().count() == 0
    assert c.alive(), f"a worker crashed: {c.exits()}"


def test_rabbitmq_pool_processes_and_a_worker_sigkilled_lose_nothing(node: RabbitMQNode) -> None:
    n_events, n_identify, pace = 600, 200, 4.0
    with chaos_cluster(workers=2, concurrency=2, broker="rabbitmq", rabbitmq=node) as c:
        c.fake.set_latency(0.02)
        victim = c.workers[0]
        started = time.monotonic()
        producer = stream(c, n_events, pace, n_identify)
        applied_at_kills = []
        child_kills = 0
        for at in (0.8, 1.6, 2.4):  # three pool processes, one at a time (the worker replaces each)
            time.sleep(max(0.0, started + at - time.monotonic()))
            child_kills += victim.kill_child() is not None
            applied_at_kills.append(len(c.fake.applied))
        time.sleep(max(0.0, started + 3.2 - time.monotonic()))
        victim.kill()  # the whole worker: RabbitMQ hands its unacknowledged messages to the other
        applied_at_kills.append(len(c.fake.applied))
        time.sleep(1.0)
        victim.start(c.broker_url)
        producer.join(30)
        wait_all_applied(c, n_events, timeout=90)
        wait_all_applied(c, n_identify, timeout=60, operation="identify")
        time.sleep(1.0)
        assert_each_applied_once(c, n_events)
        people = c.applied("identify")
        assert sorted(people) == list(range(n_identify))
        stats = c.fake.stats
        report(
            "rabbitmq_sigkill",
            pool_process_kills=child_kills,
            worker_kills=1,
            events=n_events,
            identify_ops=n_identify,
            enqueued_over_seconds=pace,
            kills_at_seconds="0.8,1.6,2.4 (pool),3.2 (worker)",
            applied_at_each_kill=applied_at_kills,
            events_applied_twice=0,
            event_requests_dropped_as_duplicates_by_the_fake=stats["duplicates_ignored"],
            identify_applied_twice=sum(v - 1 for v in people.values()),
            requests=stats["received"],
            seconds=round(time.monotonic() - started, 1),
        )
    assert child_kills == 3


def test_rabbitmq_stopped_and_then_sigkilled_under_load_loses_nothing(node: RabbitMQNode) -> None:
    n, pace, down = 1000, 20.0, 2.0
    with chaos_cluster(workers=2, concurrency=2, broker="rabbitmq", rabbitmq=node) as c:
        c.fake.set_latency(0.01)
        started = time.monotonic()
        producer = stream(c, n, pace)  # the app publishes through both stops (spooling while down)
        marks, spooled = [], []

        def stop(kill: bool) -> None:
            marks.append((round(time.monotonic() - started, 1), len(c.task_ids), len(c.fake.applied)))
            node.stop(kill=kill)
            time.sleep(down)
            spooled.append(spool_depth(c.producer))
            node.start()

        time.sleep(2.0)
        stop(kill=False)  # SIGTERM: a clean shutdown
        # The crash comes once the workers are back (Celery's reconnect backoff: 2, 4, 6 ... s) and
        # delivering again, while the app still publishes.
        wait_applied_count(c, marks[0][2] + 100, timeout=60)
        stop(kill=True)  # SIGKILL: a crash
        producer.join(30)
        took = wait_all_applied(c, n, timeout=120)
        time.sleep(1.0)
        assert_each_applied_once(c, n)
        assert all(applied < n for _, _, applied in marks)
        report("rabbitmq_restarted_twice", operations=n, enqueued_over_seconds=pace, processes=4,
               seconds_enqueued_and_applied_at_each_stop=marks, stops="sigterm,sigkill", down_seconds=down,
               node_start_seconds=node.start_seconds[-2:], spooled_at_each_start=spooled,
               seconds_to_finish_after_second_restart=round(took, 1), requests=c.fake.stats["received"],
               duplicate_requests_ignored_by_event_id=c.fake.stats["duplicates_ignored"],
               seconds=round(time.monotonic() - started, 1))


@pytest.mark.full
def test_rabbitmq_down_5s_while_the_app_enqueues_500_operations(node: RabbitMQNode, tmp_path: Path) -> None:
    n, down = 500, 5.0
    with chaos_cluster(workers=2, concurrency=2, broker="rabbitmq", rabbitmq=node, tmp=tmp_path) as c:
        c.fake.set_latency(0.002)
        settings = settings_for_app(c.producer)
        track = c.task("track")
        # The producer's connection is made (an identify: not counted among the events).
        c.task("identify").delay("warm-up", seq=-1)
        wait_applied_count(c, 1)
        node.stop()
        down_at = time.monotonic()
        durations: list[float] = []
        raised = 0
        for i in range(n):
            t0 = time.perf_counter()
            try:
                track.delay(f"user-{i % 97}", "chaos", {"seq": i})
            except Exception:  # counted: the app must never see one
                raised += 1
            durations.append(time.perf_counter() - t0)
            time.sleep(max(0.0, down_at + down * (i + 1) / n - time.monotonic()))
        spooled = spool_depth(c.producer)
        time.sleep(max(0.0, down_at + down - time.monotonic()))
        node.start()
        took = wait_all_applied(c, n, timeout=90)
        time.sleep(1.0)
        assert raised == 0
        assert_each_applied_once(c, n)
        assert spool_depth(c.producer) == 0
        durations.sort()
        bound = settings.enqueue_timeout + 0.5  # the wait, plus a spool write on a loaded CI disk
        assert durations[-1] <= bound, f"slowest enqueue {durations[-1]:.3f}s"
        report("rabbitmq_down_5s", operations=n, raised=raised, spooled_while_down=spooled,
               enqueue_timeout=settings.enqueue_timeout, slowest_enqueue_ms=round(durations[-1] * 1000, 1),
               p99_enqueue_ms=round(durations[int(n * 0.99)] * 1000, 2),
               median_enqueue_ms=round(durations[n // 2] * 1000, 2),
               seconds_to_deliver_all_after_broker_back=round(took, 1), requests=c.fake.stats["received"])


@pytest.mark.full
def test_rabbitmq_with_the_store_down_3s_under_load_loses_nothing(node: RabbitMQNode) -> None:
    n, pace = 800, 4.0
    with chaos_cluster(workers=2, concurrency=2, broker="rabbitmq", rabbitmq=node) as c:
        c.fake.set_latency(0.02)
        started = time.monotonic()
        producer = stream(c, n, pace)
        time.sleep(1.0)
        applied_before = len(c.fake.applied)
        c.store.stop()  # while operations keep arriving: their waits are countdowns RabbitMQ's workers hold
        time.sleep(3.0)
        c.store.start()
        producer.join(30)
        took = wait_all_applied(c, n, timeout=90)
        time.sleep(1.0)
        assert_each_applied_once(c, n)
        report("rabbitmq_store_down_3s", operations=n, enqueued_over_seconds=pace, processes=4,
               applied_before_stop=applied_before, store_down_seconds=3,
               seconds_to_finish_after_restart=round(took, 1), requests=c.fake.stats["received"],
               duplicate_requests_ignored_by_event_id=c.fake.stats["duplicates_ignored"],
               worker_log_store_waits=sum(w.log_text().count("store_unavailable") for w in c.workers),
               seconds=round(time.monotonic() - started, 1))


def test_rabbitmq_customerio_down_10s_trips_the_breaker_parks_and_delivers_everything_once_after(
    node: RabbitMQNode,
) -> None:
    n_before, n_during, outage = 100, 400, 10.0
    with chaos_cluster(workers=2, concurrency=2, broker="rabbitmq", rabbitmq=node) as c:
        breaker = Breaker(settings_for_app(c.producer))
        c.enqueue_track(n_before)
        wait_all_applied(c, n_before, timeout=60)
        c.fake.start_outage(outage, status=503)
        outage_start = time.monotonic()
        requests_at_start = c.fake.stats["received"]
        for i in range(n_during):
            c.task_ids[n_before + i] = c.task("track").delay(f"user-{i % 97}", "chaos", {"seq": n_before + i}).id
            time.sleep(0.01)
        peak_parked = 0
        while time.monotonic() - outage_start < outage:
            peak_parked = max(peak_parked, c.fallback().depth())
            time.sleep(0.2)
        outage_requests = c.fake.stats["received"] - requests_at_start
        trips = breaker.status().trips
        took = wait_all_applied(c, n_before + n_during, timeout=90)
        time.sleep(1.0)
        assert_each_applied_once(c, n_before + n_during)
        assert trips >= 1 and peak_parked > 0
        assert outage_requests < n_during / 4, "the breaker kept calls away from the dead upstream"
        assert c.fallback().depth() == 0
        report("rabbitmq_outage_10s", operations=n_before + n_during, requests_during_outage=outage_requests,
               trips=trips, peak_parked=peak_parked, seconds_to_deliver_all_after_outage=round(took, 1),
               breaker_state_after=breaker.status().state)
