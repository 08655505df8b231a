"""The Prometheus collector reads the shared state live, from a real Redis, on each scrape.

Operations run through the embedded worker against the fake Customer.io; nothing of
cio_celery is mocked.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import cio_celery
from cio_celery.breaker import Breaker
from cio_celery.contrib.prometheus import CORRUPT_RESETS_FIELD, TRIPS_TOTAL_FIELD, CioCollector, register
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.quarantine import Quarantine
from cio_celery.settings import Settings, settings_for_app
from cio_celery.store import key
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

EMAIL = "ada-prometheus@example.com"
SECRET_VALUE = "secret-plan-prometheus"


def scrape(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def fresh(app: Any, settings: Settings | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    register(app, registry, settings=settings)
    return registry


def test_every_metric_is_exposed_with_its_type(worker_app: Any) -> None:
    registry = fresh(worker_app)
    text = generate_latest(registry).decode()
    for name, kind in [
        ("cio_celery_store_up", "gauge"),
        ("cio_celery_breaker_state", "gauge"),
        ("cio_celery_breaker_time_left_seconds", "gauge"),
        ("cio_celery_breaker_trips", "counter"),
        ("cio_celery_fallback_depth", "gauge"),
        ("cio_celery_dead_letters", "gauge"),
        ("cio_celery_spool_depth", "gauge"),
        ("cio_celery_spool_quarantine", "gauge"),
        ("cio_celery_spool_bytes", "gauge"),
        ("cio_celery_spool_max_bytes", "gauge"),
        ("cio_celery_suppressed_duplicates", "counter"),
        ("cio_celery_retries", "counter"),
        ("cio_celery_breaker_corrupt_resets", "counter"),
        ("cio_celery_quarantine", "gauge"),
        ("cio_celery_ledger_depth", "gauge"),
        ("cio_celery_ledger_overdue", "gauge"),
        ("cio_celery_ledger_oldest_overdue_seconds", "gauge"),
    ]:
        # prometheus_client names a counter's TYPE line with or without "_total" (0.26: with).
        assert re.search(rf"^# TYPE {name}(_total)? {kind}$", text, re.M), name
    m = scrape(registry)
    assert m[("cio_celery_store_up", ())] == 1
    assert {s for (n, s) in m if n == "cio_celery_breaker_state"} == {
        (("state", "closed"),), (("state", "half-open"),), (("state", "open"),)}
    assert m[("cio_celery_breaker_state", (("state", "closed"),))] == 1
    assert m[("cio_celery_breaker_state", (("state", "open"),))] == 0
    assert m[("cio_celery_breaker_time_left_seconds", ())] == 0
    assert m[("cio_celery_breaker_trips_total", ())] == 0
    assert m[("cio_celery_fallback_depth", ())] == 0
    assert m[("cio_celery_dead_letters", ())] == 0
    assert m[("cio_celery_spool_depth", ())] == 0
    assert m[("cio_celery_spool_quarantine", ())] == 0
    assert m[("cio_celery_spool_max_bytes", ())] == 256 * 1024 * 1024
    assert m[("cio_celery_breaker_corrupt_resets_total", ())] == 0
    assert m[("cio_celery_quarantine", ())] == 0
    assert m[("cio_celery_ledger_overdue", ())] == 0


def test_dead_letters_and_retries_by_reason(worker_app: Any, fake: FakeCustomerIO) -> None:
    registry = fresh(worker_app)
    letters = DeadLetters(settings_for_app(worker_app), worker_app)
    # A permanent 4xx: one dead letter, no retry.
    fake.fail_next(1, status=400)
    cio_celery.identify.delay("user-prom-1", email=EMAIL, plan=SECRET_VALUE)
    wait_for(lambda: letters.count() == 1)
    assert scrape(registry)[("cio_celery_dead_letters", ())] == 1
    # A 503, then a 429, then success: one retry counted under each reason.
    fake.fail_next(1, status=503)
    fake.fail_next(1, status=429, retry_after=0.1)
    cio_celery.track.delay("user-prom-1", "upgraded", {"plan": SECRET_VALUE})
    fake.wait_for_applied(1, timeout=20)
    m = scrape(registry)
    assert m[("cio_celery_retries_total", (("reason", "http_503"),))] == 1
    assert m[("cio_celery_retries_total", (("reason", "http_429"),))] == 1
    assert m[("cio_celery_dead_letters", ())] == 1
    # Replaying the dead letter empties the store: the figure is a gauge, read live.
    letters.purge()
    assert scrape(registry)[("cio_celery_dead_letters", ())] == 0
    text = generate_latest(registry).decode()
    assert EMAIL not in text and SECRET_VALUE not in text and "user-prom-1" not in text


def test_suppressed_duplicates_by_operation(worker_app: Any, fake: FakeCustomerIO) -> None:
    registry = fresh(worker_app)
    cio_celery.identify.apply_async(("user-prom-2",), {"email": EMAIL}, idempotency_key="signup-prom-2")
    fake.wait_for_applied(1, timeout=20)
    assert ("cio_celery_suppressed_duplicates_total", (("operation", "identify"),)) not in scrape(registry)
    cio_celery.identify.apply_async(("user-prom-2",), {"email": EMAIL}, idempotency_key="signup-prom-2")
    wait_for(lambda: scrape(registry).get(
        ("cio_celery_suppressed_duplicates_total", (("operation", "identify"),))) == 1)
    cio_celery.identify.apply_async(("user-prom-2",), {"email": EMAIL}, idempotency_key="signup-prom-2")
    wait_for(lambda: scrape(registry).get(
        ("cio_celery_suppressed_duplicates_total", (("operation", "identify"),))) == 2)
    assert len(fake.applied) == 1
    text = generate_latest(registry).decode()
    assert "signup-prom-2" not in text and EMAIL not in text


def test_breaker_open_and_parked_operations(worker_app: Any, fake: FakeCustomerIO) -> None:
    registry = fresh(worker_app)
    settings = settings_for_app(worker_app)
    breaker = Breaker(settings)
    breaker.open(30)
    try:
        cio_celery.track.delay("user-prom-3", "parked", {"plan": SECRET_VALUE})
        cio_celery.track.delay("user-prom-4", "parked", {"plan": SECRET_VALUE})
        wait_for(lambda: scrape(registry)[("cio_celery_fallback_depth", ())] == 2)
        m = scrape(registry)
        assert m[("cio_celery_breaker_state", (("state", "open"),))] == 1
        assert m[("cio_celery_breaker_state", (("state", "closed"),))] == 0
        assert 25 < m[("cio_celery_breaker_time_left_seconds", ())] <= 30
        # Opened by hand: not a trip.
        assert m[("cio_celery_breaker_trips_total", ())] == 0
        breaker.open()  # until closed by hand
        assert scrape(registry)[("cio_celery_breaker_time_left_seconds", ())] == -1
    finally:
        breaker.close()
    # Closed again: released (as `celery cio fallback release` or a worker's releaser thread
    # would; the embedded test worker runs no releaser), then delivered.
    assert Fallback(settings, worker_app).release(10) == 2
    fake.wait_for_applied(2, timeout=20)
    wait_for(lambda: scrape(registry)[("cio_celery_fallback_depth", ())] == 0)
    m = scrape(registry)
    assert m[("cio_celery_breaker_state", (("state", "closed"),))] == 1
    assert m[("cio_celery_breaker_time_left_seconds", ())] == 0


def test_trips_total_counts_every_trip(store: redis.Redis, store_url: str, tmp_path: Path) -> None:
    # Its own key prefix: the explicit clock below must not disturb the embedded worker's breaker.
    settings = Settings(redis_url=store_url, key_prefix="cio-prom-trips", breaker_consecutive_failures=2,
                        breaker_minimum_calls=1000, breaker_open_base=10, breaker_open_max=300,
                        breaker_close_after=1)
    app = Celery("prom-trips", set_as_current=False)
    app.conf.cio_spool_dir = str(tmp_path)
    registry = CollectorRegistry()
    registry.register(CioCollector(app, settings))
    now = [1_000_000.0]
    breaker = Breaker(settings, clock=lambda: now[0])
    for n in (1, 2, 3):
        for _ in range(2):
            breaker.record(breaker.acquire(), "failure")
        assert scrape(registry)[("cio_celery_breaker_trips_total", ())] == n
        # The breaker's own count of trips in a row starts again after a long closed spell;
        # the counter does not.
        assert breaker.status().trips == 1
        now[0] += 400
        breaker.record(breaker.acquire(), "success")
        assert breaker.status().state == "closed"
        now[0] += 1000
    breaker.open()  # by hand: not a trip
    breaker.reset()  # forgets the run of trips, keeps the counter
    assert scrape(registry)[("cio_celery_breaker_trips_total", ())] == 3
    assert int(store.hget("{cio-prom-trips}:breaker:customerio", TRIPS_TOTAL_FIELD) or 0) == 3


def test_store_down_is_a_zero_not_an_exception(worker_app: Any) -> None:
    unreachable = Settings(redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0")
    m = scrape(fresh(worker_app, unreachable))
    assert m[("cio_celery_store_up", ())] == 0
    assert ("cio_celery_fallback_depth", ()) not in m
    assert ("cio_celery_breaker_state", (("state", "closed"),)) not in m
    # The local spool needs no Redis: still reported.
    assert m[("cio_celery_spool_depth", ())] == 0


def test_unconfigured_store_is_a_zero_not_an_exception(tmp_path: Path) -> None:
    app = Celery("prom-unconfigured", broker="memory://", set_as_current=False)
    app.conf.cio_spool_dir = str(tmp_path)
    registry = CollectorRegistry()
    collector = register(app, registry)
    assert list(collector.describe()) == []  # registering does not touch Redis
    m = scrape(registry)
    assert m[("cio_celery_store_up", ())] == 0


def test_store_outage_and_recovery(tmp_path: Path) -> None:
    # A dedicated redis-server, stopped and started on the same port under the collector.
    with RedisServer() as server:
        settings = Settings(redis_url=f"{server.url}/0")
        app = Celery("prom-outage", set_as_current=False)
        app.conf.cio_spool_dir = str(tmp_path)
        registry = fresh(app, settings)
        assert scrape(registry)[("cio_celery_store_up", ())] == 1
        server.stop()
        m = scrape(registry)
        assert m[("cio_celery_store_up", ())] == 0 and ("cio_celery_dead_letters", ()) not in m
        server.start()
        wait_for(lambda: scrape(registry)[("cio_celery_store_up", ())] == 1, timeout=10)
        assert scrape(registry)[("cio_celery_dead_letters", ())] == 0


def test_the_health_verdict_and_the_queues_as_metrics(worker_app: Any, redis_base_url: str, tmp_path: Path) -> None:
    from cio_celery.health import PROBLEM_NAMES, forget_workers

    forget_workers()
    m = scrape(fresh(worker_app))
    assert m[("cio_celery_healthy", ())] == 1
    assert all(m[("cio_celery_problem", (("name", n),))] == 0 for n in PROBLEM_NAMES)
    # The embedded worker consumes the three queues; Redis counts no consumers: the workers answered.
    assert m[("cio_celery_queue_consumers", (("queue", "cio"),))] == 1
    assert m[("cio_celery_queue_consumers", (("queue", "cio.fallback"),))] == 1

    # An app whose queues nobody consumes: one operation waits, read from the broker.
    broker = f"{redis_base_url}/10"
    redis.Redis.from_url(broker).flushdb()
    lonely = Celery("prom-no-worker", broker=broker, include=["cio_celery.tasks"], set_as_current=False)
    settings = Settings(redis_url=settings_for_app(worker_app).redis_url, spool_dir=str(tmp_path), site_id="s",
                        track_api_key="t", app_api_key="a")
    cio_celery.configure(lonely, settings)
    try:
        lonely.tasks["cio_celery.identify"].delay("user-prom")
        registry = CollectorRegistry()
        register(lonely, registry, settings=settings, health={"inspect_timeout": 0.3, "ignore": ("spool_stale",)})
        m = scrape(registry)
        assert m[("cio_celery_healthy", ())] == 0
        assert m[("cio_celery_problem", (("name", "queue_not_consumed"),))] == 1
        assert m[("cio_celery_problem", (("name", "breaker_open"),))] == 0
        assert m[("cio_celery_queue_depth", (("queue", "cio"),))] == 1
        assert m[("cio_celery_queue_consumers", (("queue", "cio"),))] == 0
    finally:
        from cio_celery.spool import publisher_for

        publisher_for(lonely).stop()
        redis.Redis.from_url(broker).flushdb()


def test_breaker_corrupt_resets_are_counted_and_a_worker_goes_on(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    registry = fresh(worker_app)
    bkey = key(settings_for_app(worker_app), "breaker", "customerio")
    for n in (1, 2):
        store.hset(bkey, mapping={"st": 0, "gen": "garbage"})  # a hand-edited hash
        cio_celery.track.delay(f"user-reset-{n}", "after_damage", {"n": n})
        fake.wait_for_applied(n, timeout=15)  # the worker reset it (counted) and delivered
        m = scrape(registry)
        assert m[("cio_celery_breaker_corrupt_resets_total", ())] == n
        assert m[("cio_celery_breaker_state", (("state", "closed"),))] == 1
        assert m[("cio_celery_healthy", ())] == 1  # reported, not a problem by itself
    assert int(store.hget(bkey, CORRUPT_RESETS_FIELD) or 0) == 2


def test_the_store_quarantine_and_the_ledger_as_metrics(worker_app: Any, store: redis.Redis, tmp_path: Path,
                                                       redis_base_url: str) -> None:
    s = settings_for_app(worker_app)
    registry = fresh(worker_app)
    store.lpush(key(s, "fallback", "ops"), b"not json " + EMAIL.encode())
    assert Fallback(s, worker_app).release(10) == 1  # unreadable: moved to the quarantine
    m = scrape(registry)
    assert m[("cio_celery_quarantine", ())] == 1
    assert m[("cio_celery_problem", (("name", "quarantine_not_empty"),))] == 1
    assert EMAIL not in generate_latest(registry).decode()
    Quarantine(s).purge()
    assert scrape(registry)[("cio_celery_quarantine", ())] == 0

    # An app whose queue nobody consumes, with a 5 s grace: its operation is in the ledger, then
    # overdue (no releaser sweeps it), read live.
    broker = f"{redis_base_url}/10"
    redis.Redis.from_url(broker).flushdb()
    lonely = Celery("prom-ledger", broker=broker, include=["cio_celery.tasks"], set_as_current=False)
    settings = Settings(redis_url=s.redis_url, key_prefix="cio-prom-ledger", spool_dir=str(tmp_path), site_id="s",
                        track_api_key="t", app_api_key="a", visibility_timeout=5.0)
    cio_celery.configure(lonely, settings)
    try:
        started = time.monotonic()
        lonely.tasks["cio_celery.identify"].delay("user-ledger")
        ledger = CollectorRegistry()
        register(lonely, ledger, settings=settings,
                 health={"inspect_timeout": 0.3, "ignore": ("queue_not_consumed",), "max_ledger_overdue": 1.0})
        wait_for(lambda: scrape(ledger).get(("cio_celery_ledger_depth", ())) == 1)
        m = scrape(ledger)
        if time.monotonic() - started < 4:  # due after the 5 s grace
            assert m[("cio_celery_ledger_overdue", ())] == 0
            assert m[("cio_celery_ledger_oldest_overdue_seconds", ())] == 0
        wait_for(lambda: scrape(ledger)[("cio_celery_problem", (("name", "ledger_overdue"),))] == 1, timeout=30)
        m = scrape(ledger)
        assert m[("cio_celery_ledger_overdue", ())] == 1 and m[("cio_celery_ledger_depth", ())] == 1
        assert m[("cio_celery_ledger_oldest_overdue_seconds", ())] > 1
        assert m[("cio_celery_healthy", ())] == 0
    finally:
        from cio_celery.spool import publisher_for

        publisher_for(lonely).stop()
        redis.Redis.from_url(broker).flushdb()


def test_this_hosts_spool_quarantine_and_bytes(redis_base_url: str, tmp_path: Path) -> None:
    """A web app's spool holds a row no broker takes: after spool_max_attempts failures with the
    broker answering it is quarantined, and the collector on this host says so."""
    from cio_celery.spool import flush_spool, publisher_for, spool_for

    broker = f"{redis_base_url}/10"
    redis.Redis.from_url(broker).flushdb()
    web = Celery("prom-spool", broker=broker, include=["cio_celery.tasks"], set_as_current=False)
    settings = Settings(redis_url=f"{redis_base_url}/11", spool_dir=str(tmp_path), site_id="s", track_api_key="t",
                        app_api_key="a", spool_max_attempts=1, spool_flush_interval=3600, spool_max_bytes=1024 * 1024)
    cio_celery.configure(web, settings)
    try:
        spool_for(web).put({"task": "cio_celery.identify", "args": [EMAIL], "kwargs": {"_cio": {"key": "b"}},
                            "task_id": "b", "options": {"queue": "cio", "expires": "soon"}})
        registry = CollectorRegistry()
        register(web, registry, settings=settings, health={"inspect_timeout": 0.3,
                                                           "ignore": ("queue_not_consumed",)})
        m = scrape(registry)
        assert m[("cio_celery_spool_depth", ())] == 1 and m[("cio_celery_spool_quarantine", ())] == 0
        used = m[("cio_celery_spool_bytes", ())]
        assert used > 0 and m[("cio_celery_spool_max_bytes", ())] == 1024 * 1024
        assert flush_spool(web).quarantined == 1
        m = scrape(registry)
        assert m[("cio_celery_spool_depth", ())] == 0 and m[("cio_celery_spool_quarantine", ())] == 1
        assert m[("cio_celery_spool_bytes", ())] == used  # quarantined rows still count
        assert m[("cio_celery_problem", (("name", "spool_quarantine_not_empty"),))] == 1
        assert m[("cio_celery_problem", (("name", "spool_near_full"),))] == 0
        assert EMAIL not in generate_latest(registry).decode()
    finally:
        publisher_for(web).stop()
        redis.Redis.from_url(broker).flushdb()
