"""The Prometheus collector reads the shared state live, from a real Redis, on each scrape."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import cio_celery
from cio_celery.breaker import Breaker
from cio_celery.contrib.prometheus import register
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import Settings, settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import free_port


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def test_metrics_follow_the_shared_state(worker_app: Any, fake: FakeCustomerIO) -> None:
    registry = CollectorRegistry()
    register(worker_app, registry)
    m = scrape(registry)
    assert m[("cio_celery_store_up", ())] == 1
    assert m[("cio_celery_breaker_state", (("state", "closed"),))] == 1
    assert m[("cio_celery_breaker_state", (("state", "open"),))] == 0
    assert m[("cio_celery_fallback_depth", ())] == 0
    assert m[("cio_celery_dead_letters", ())] == 0
    assert m[("cio_celery_spool_depth", ())] == 0

    # A permanent 4xx: one dead letter. A 503 then success: one retry counted by its reason.
    fake.fail_next(1, status=400)
    cio_celery.identify.delay("user-1", email="ada@example.com")
    letters = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_for(lambda: letters.count() == 1)
    fake.fail_next(1, status=503)
    cio_celery.track.delay("user-1", "ev")
    fake.wait_for_applied(1, timeout=20)
    # The same caller key twice: one suppressed duplicate.
    cio_celery.identify.apply_async(("user-2",), {"plan": "pro"}, idempotency_key="signup-2")
    fake.wait_for_applied(2, timeout=20)
    cio_celery.identify.apply_async(("user-2",), {"plan": "pro"}, idempotency_key="signup-2")
    wait_for(lambda: scrape(registry).get(("cio_celery_suppressed_duplicates_total",
                                           (("operation", "identify"),))) == 1)
    m = scrape(registry)
    assert m[("cio_celery_dead_letters", ())] == 1
    assert m[("cio_celery_retries_total", (("reason", "http_503"),))] == 1
    text = generate_latest(registry).decode()
    assert "ada@example.com" not in text and "user-1" not in text

    breaker = Breaker(settings_for_app(worker_app))
    breaker.open(30)
    try:
        cio_celery.track.delay("user-3", "parked")
        wait_for(lambda: scrape(registry)[("cio_celery_fallback_depth", ())] == 1)
        m = scrape(registry)
        assert m[("cio_celery_breaker_state", (("state", "open"),))] == 1
        assert 25 < m[("cio_celery_breaker_time_left_seconds", ())] <= 30
        assert m[("cio_celery_breaker_trips_total", ())] >= 0
    finally:
        breaker.reset()


def test_store_down_is_a_zero_not_an_exception(worker_app: Any) -> None:
    registry = CollectorRegistry()
    register(worker_app, registry, settings=Settings(redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0"))
    m = scrape(registry)
    assert m[("cio_celery_store_up", ())] == 0
    assert ("cio_celery_fallback_depth", ()) not in m
