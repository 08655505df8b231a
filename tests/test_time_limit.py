"""A delivery killed by the hard time limit is requeued, not acknowledged and lost.

Celery acknowledges such a message by default (``task_acks_on_failure_or_timeout``); the
package's tasks requeue it, and the claim's count of attempts that never finished turns an
operation that kills its worker every time into a dead letter instead of an endless loop.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos_harness import chaos_cluster, wait_all_applied

pytestmark = pytest.mark.slow

# The HTTP call (latency 2.5 s, timeout 5 s) outlives the 1 s hard limit: the pool kills it.
ENV = {"CIO_TIMEOUT": "5", "CIO_TASK_TIME_LIMIT": "1", "CIO_IDEMPOTENCY_LEASE": "1.5"}


def test_a_delivery_killed_by_the_time_limit_is_redelivered_and_applied_once() -> None:
    n = 3
    with chaos_cluster(workers=1, concurrency=2, **ENV) as c:
        c.fake.set_latency(2.5)
        c.enqueue_track(n)
        deadline = time.monotonic() + 30
        worker = c.workers[0]
        while "Hard time limit" not in worker.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Hard time limit" in worker.log_path.read_text()
        c.fake.set_latency(0)
        wait_all_applied(c, n, timeout=60)
        time.sleep(1.0)
        applied = c.applied()
        # Killed requests may have been applied server-side; their re-sends carry the same
        # event id, which the fake (like Customer.io) ignores.
        assert sorted(applied) == list(range(n)) and max(applied.values()) == 1
        assert c.dead_letters().count() == 0


def test_an_operation_that_always_hits_the_time_limit_ends_in_dead_letters() -> None:
    with chaos_cluster(workers=1, concurrency=1, CIO_MAX_RETRIES="2", **ENV) as c:
        c.fake.set_latency(2.5)
        c.task("identify").delay("user-1", seq=0)
        deadline = time.monotonic() + 60
        while c.dead_letters().count() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        letters = c.dead_letters().list()
        assert [d.reason for d in letters] == ["worker_lost_repeatedly"]
        # max_retries = 2: the third attempt killed mid-call is the last one.
        log = c.workers[0].log_path.read_text()
        assert log.count("Hard time limit (1.0s) exceeded for cio_celery.identify") == 3
