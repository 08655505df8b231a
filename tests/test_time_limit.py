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
        while "Hard time limit" not in worker.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Hard time limit" in worker.log_text()
        c.fake.set_latency(0)
        wait_all_applied(c, n, timeout=60)
        time.sleep(1.0)
        applied = c.applied()
        # Killed requests may have been applied server-side; their re-sends carry the same
        # event id, which the fake (like Customer.io) ignores.
        assert sorted(applied) == list(range(n)) and max(applied.values()) == 1
        assert c.dead_letters().count() == 0


def test_an_operation_that_always_hits_the_time_limit_ends_in_dead_letters() -> None:
    # One request an operation: an identify that waited past the batching linger would go in a
    # batch, and the kills counted below would be the batch's (the batch case is the last test).
    with chaos_cluster(workers=1, concurrency=1, CIO_MAX_RETRIES="2", CIO_BATCH_COALESCE="0", **ENV) as c:
        c.fake.set_latency(2.5)
        c.task("identify").delay("user-1", seq=0)
        deadline = time.monotonic() + 60
        while c.dead_letters().count() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        letters = c.dead_letters().list()
        assert [d.reason for d in letters] == ["worker_lost_repeatedly"]
        # max_retries = 2: the third attempt killed mid-call is the last one.
        log = c.workers[0].log_text()
        assert log.count("Hard time limit (1.0s) exceeded for cio_celery.identify") == 3


def test_a_poison_operation_in_a_batch_is_dead_lettered_alone_and_the_rest_delivered_once() -> None:
    """A batch whose request outlives the time limit every time because of one item: after the
    first kill each item goes on alone (its attempt marker kept), so only that item ends in
    dead letters, after max_retries + 1 kills; the others are applied once."""
    from cio_celery.batching import BATCH_TASK
    from cio_celery.meta import internal_publish
    from cio_celery.settings import settings_for_app
    from cio_celery.ulid import new_ulid

    with chaos_cluster(workers=1, concurrency=1, CIO_MAX_RETRIES="2", **ENV) as c:
        c.fake.set_slow_for("poison-user", 2.5)
        users = ["user-0", "user-1", "poison-user", "user-3", "user-4"]
        group = [{"operation": "track", "task_id": f"item-{i}", "kwargs": {},
                  "args": [u, "batched", {"seq": i}, new_ulid(), None]} for i, u in enumerate(users)]
        with internal_publish():
            c.producer.tasks[BATCH_TASK].apply_async(args=[group],
                                                     queue=settings_for_app(c.producer).fallback_queue)
        deadline = time.monotonic() + 60
        while c.dead_letters().count() == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        letters = c.dead_letters().list()
        assert [(d.reason, d.args[0]) for d in letters] == [("worker_lost_repeatedly", "poison-user")]
        applied = c.applied()
        # The fake, like Customer.io, applies the slow request after the client is gone; its
        # re-sends carry the same event id and are ignored: each applied once.
        assert sorted(applied) == [0, 1, 2, 3, 4] and max(applied.values()) == 1
        log = c.workers[0].log_text()
        # The batch once, then the poison item alone twice: max_retries = 2.
        assert log.count("Hard time limit (1.0s) exceeded for cio_celery.deliver_batch") == 1
        assert log.count("Hard time limit (1.0s) exceeded for cio_celery.track") == 2
