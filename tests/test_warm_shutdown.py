"""A warm shutdown (SIGTERM) finishes the deliveries in flight; the rest stay queued, none is lost."""

from __future__ import annotations

import signal
import time

import pytest

from cio_celery.testing.fake import RecordedRequest
from tests.chaos_harness import chaos_cluster, wait_all_applied

pytestmark = pytest.mark.slow


def operations_sent(requests: list[RecordedRequest]) -> int:
    """Operations that reached the fake: one per request, or each item of a v2 batch request
    (the worker restarted into a backlog may coalesce it)."""
    return sum(len((r.json or {}).get("batch") or []) if r.path == "/api/v2/batch" else 1
               for r in requests)


def test_sigterm_finishes_in_flight_deliveries_and_leaves_the_rest_queued() -> None:
    n = 12
    # One request an operation: with adaptive batching a loaded machine can let the whole backlog
    # wait past the linger and leave in the first batch, and nothing would be left queued to see.
    with chaos_cluster(workers=1, concurrency=2, CIO_TIMEOUT="5", CIO_BATCH_COALESCE="0") as c:
        c.fake.set_latency(1.5)
        c.enqueue_track(n)
        worker = c.workers[0]
        deadline = time.monotonic() + 20
        while c.fake.stats["received"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = c.fake.stats["received"]
        assert in_flight >= 1
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0, "warm shutdown exits cleanly"
        worker.proc = None
        worker.log.close()
        finished = c.applied()
        # Everything that had reached Customer.io was finished (and acked), not cut off.
        assert sum(finished.values()) == operations_sent(c.fake.requests) >= in_flight
        assert sum(finished.values()) < n, "the worker stopped taking new work"
        assert "Warm shutdown" in worker.log_text()
        c.fake.set_latency(0)
        worker.start(c.broker_url)
        wait_all_applied(c, n, timeout=30)
        time.sleep(0.5)
        applied = c.applied()
        assert sorted(applied) == list(range(n)) and max(applied.values()) == 1
        assert operations_sent(c.fake.requests) == n, "nothing finished before the shutdown was sent again"
