"""The breaker across 4 real worker processes: no call while open, at most K per half-open window,
every operation delivered once after recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from cio_celery.breaker import Breaker
from cio_celery.fallback import Fallback
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from tests.helpers import wait_until
from tests.workers import WorkerProcess, flush, worker_env

pytestmark = pytest.mark.slow

BREAKER_ENV = {
    "CIO_BREAKER_CONSECUTIVE_FAILURES": "5",
    "CIO_BREAKER_MINIMUM_CALLS": "10",
    "CIO_BREAKER_OPEN_BASE": "1.5",
    "CIO_BREAKER_OPEN_MAX": "3",
    "CIO_BREAKER_OPEN_JITTER": "0",
    "CIO_BREAKER_HALF_OPEN_PROBES": "2",
    "CIO_BREAKER_CLOSE_AFTER": "2",
    "CIO_RETRY_BACKOFF_BASE": "0.1",
    "CIO_RETRY_BACKOFF_MAX": "0.5",
    "CIO_MAX_RETRIES": "50",
    "CIO_FALLBACK_RELEASE_INTERVAL": "0.2",
    "CIO_FALLBACK_RELEASE_RATE": "500",
}


@pytest.fixture()
def cluster(redis_base_url: str) -> Iterator[dict[str, Any]]:
    broker_url, store_url = f"{redis_base_url}/3", f"{redis_base_url}/4"
    flush(broker_url)
    flush(store_url)
    fake = FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak").start()
    env = worker_env(fake, broker_url, store_url, CIO_TEST_EVENTS="1", **BREAKER_ENV)
    producer = Celery("producer", broker=broker_url, set_as_current=False)
    producer.conf.update({k.lower(): v for k, v in env.items() if k.startswith("CIO_")})
    producer.loader.import_default_modules()
    producer.conf.include = ["cio_celery.tasks"]
    import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

    producer.finalize(auto=True)
    events: list[dict[str, Any]] = []
    stop = threading.Event()
    receivers: list[Any] = []

    def capture() -> None:
        # One subscription for the whole test: events go over pub/sub, which keeps nothing, so a
        # capture that timed out and subscribed again would miss what was sent in between.
        while not stop.is_set():
            with producer.connection_for_read() as conn:
                receiver = producer.events.Receiver(conn, handlers={"*": events.append})
                receivers.append(receiver)
                if stop.is_set():  # teardown already told the receivers to stop
                    break
                try:
                    receiver.capture(limit=None, timeout=None, wakeup=False)
                except (TimeoutError, OSError):
                    continue

    listener = threading.Thread(target=capture, daemon=True)
    listener.start()
    worker = WorkerProcess(env, concurrency=4, name="breaker").start(broker_url)
    try:
        yield {"fake": fake, "producer": producer, "worker": worker, "store_url": store_url, "events": events}
    finally:
        worker.stop()
        stop.set()
        for receiver in receivers:
            receiver.should_stop = True
        listener.join(5)
        fake.stop()


def test_dead_upstream_trips_once_for_the_cluster_and_everything_is_delivered_once(
    cluster: dict[str, Any],
) -> None:
    fake: FakeCustomerIO = cluster["fake"]
    producer: Celery = cluster["producer"]
    settings = settings_for_app(producer)
    breaker = Breaker(settings)
    fallback = Fallback(settings, producer)
    fake.start_outage(status=503)
    track = producer.tasks["cio_celery.track"]
    n_ops = 200
    for i in range(n_ops):
        track.delay(f"user-{i % 20}", "ordered", {"seq": i})

    wait_until(lambda: breaker.status().state != "closed", timeout=30, what="the breaker to trip")
    requests_at_trip = len(fake.requests)

    # Watch several open / half-open cycles while the upstream stays dead.
    open_violations = 0
    max_probes_per_half_open = 0
    observed_open_windows = 0
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        st = breaker.status()
        if st.state == "open" and st.time_left > 0.6:
            # A call permitted before the open (the second half-open probe, whose sibling's
            # failure reopened the breaker) may land just after it: counted from 0.25 s in.
            time.sleep(0.25)
            before = len(fake.requests)
            time.sleep(max(0.0, st.time_left - 0.45))
            still = breaker.status()
            if still.state == "open" and still.generation == st.generation:
                open_violations += len(fake.requests) - before
                observed_open_windows += 1
        else:
            time.sleep(0.01)
    trips = breaker.status().trips
    requests_during_outage = len(fake.requests) - requests_at_trip
    max_probes_per_half_open = requests_during_outage / max(1, trips - 1)
    parked = fallback.depth()

    assert observed_open_windows >= 2
    assert open_violations == 0, f"{open_violations} calls reached the dead upstream while open"
    assert trips >= 3
    # Each half-open window lets at most K=2 probes through before the first failure reopens it.
    assert requests_during_outage <= 2 * trips + 4, (requests_during_outage, trips)
    assert parked > 0

    fake.end_outage()

    def seqs() -> list[int]:
        # Parked operations are drained as /api/v2/batch items ("attributes"), the rest one by one ("data").
        return [(a.json.get("data") or a.json.get("attributes") or {})["seq"] for a in fake.applied]

    applied = wait_until(lambda: len(set(seqs())) == n_ops and fake.applied,
                         timeout=60, what="every operation to be delivered")
    time.sleep(1.0)
    assert sorted(seqs()) == list(range(n_ops)), "each operation applied exactly once"
    assert fake.stats["duplicates_ignored"] == 0, "no duplicate accepted requests"
    assert breaker.status().state == "closed"
    assert fallback.depth() == 0
    types = [e["type"] for e in cluster["events"]]
    # Each transition is announced once for the cluster, by the process that made it.
    final_trips = breaker.status().trips  # trips are remembered after closing
    assert types.count("task-cio-breaker-open") == final_trips
    assert types.count("task-cio-breaker-half-open") == final_trips
    assert types.count("task-cio-breaker-closed") == 1
    # Parked one by one (task-cio-rerouted) or as the items of a coalesced batch (task-cio-batch).
    parked_in_batches = sum(int(e.get("parked") or 0) for e in cluster["events"] if e["type"] == "task-cio-batch")
    assert types.count("task-cio-rerouted") + parked_in_batches >= parked
    print(f"\nbreaker cluster: requests before trip={requests_at_trip}, during outage={requests_during_outage}, "
          f"trips={trips}, probes/half-open<={max_probes_per_half_open:.2f}, parked peak>={parked}, "
          f"applied={len(applied)}")
