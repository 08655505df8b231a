"""Capped stores refuse instead of dropping: a full dead-letter store or fallback makes the
operation wait (a free retry every minute), and nothing already stored is lost."""

from __future__ import annotations

import time
from typing import Any

import redis

import cio_celery
from cio_celery.breaker import Breaker
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.settings import configure, settings_for_app
from cio_celery.testing import FakeCustomerIO
from tests.conftest import RecordingHandler
from tests.helpers import wait_until


def full_events(logs: RecordingHandler) -> list[Any]:
    return [r for r in logs.records if getattr(r, "cio_event", None) == "store_full"]


def test_a_full_dead_letter_store_keeps_the_operation_waiting_until_there_is_room(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler
) -> None:
    # visibility_timeout 10 s: the package's longest countdown is then 1 s (the test stays short).
    configure(worker_app, dead_letter_max_bytes=65536, visibility_timeout=10)
    letters = DeadLetters(settings_for_app(worker_app), worker_app)
    blob = "x" * 30_000
    fake.fail_next(3, status=400)
    for i in range(3):
        cio_celery.track.delay(f"user-{i}", "big", {"note": blob, "seq": i})
    wait_until(lambda: letters.count() == 2, timeout=15, what="two dead letters (the cap holds two)")
    wait_until(lambda: full_events(all_logs), timeout=15, what="the third waiting on the full store")
    assert letters.count() == 2
    _count, used = letters.usage()
    assert used <= 65536
    from cio_celery.health import health_report

    assert "dead_letters_near_full" in health_report(worker_app).problem_names
    first = letters.list()[0]
    assert letters.delete(first.id)
    waiting = {0, 1, 2} - {e.args[2]["seq"] for e in letters.list()} - {first.args[2]["seq"]}
    wait_until(lambda: {e.args[2]["seq"] for e in letters.list()} >= waiting, timeout=15,
               what="the waiting operation dead-lettered once there was room")
    assert letters.count() == 2 and len(fake.requests) == 3, "the waiting one was not sent again"
    assert fake.applied == []


def test_a_full_fallback_keeps_operations_waiting_then_delivers_each_once(
    worker_app: Any, fake: FakeCustomerIO, store: redis.Redis, all_logs: RecordingHandler
) -> None:
    configure(worker_app, fallback_max_bytes=65536, visibility_timeout=10)
    settings = settings_for_app(worker_app)
    breaker = Breaker(settings)
    fallback = Fallback(settings, worker_app)
    breaker.open()
    blob = "y" * 20_000
    for i in range(5):
        cio_celery.track.delay(f"user-{i}", "big", {"note": blob, "seq": i})
    wait_until(lambda: full_events(all_logs), timeout=15, what="an operation waiting on the full fallback")
    depth, used = fallback.usage()
    assert depth < 5 and used <= 65536, (depth, used)
    from cio_celery.health import health_report

    assert "fallback_near_full" in health_report(worker_app).problem_names
    assert fake.requests == []
    breaker.reset()
    deadline = time.monotonic() + 30
    while len(fake.applied) < 5 and time.monotonic() < deadline:
        fallback.release(10)
        time.sleep(0.2)
    time.sleep(0.5)
    assert sorted(a.json["data"]["seq"] for a in fake.applied) == [0, 1, 2, 3, 4]
    assert fallback.usage() == (0, 0)
