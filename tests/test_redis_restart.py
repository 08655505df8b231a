"""Redis (broker and store, AOF on) stopped and restarted under load: no crash, nothing lost."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.helpers import wait_until
from tests.workers import WorkerProcess, worker_env

pytestmark = pytest.mark.slow


def test_redis_restart_under_load_loses_nothing_and_crashes_no_worker() -> None:
    n_ops = 300
    with RedisServer(appendonly=True) as server, FakeCustomerIO(site_id="s", track_api_key="t",
                                                                  app_api_key="a") as fake:
        fake.set_latency(0.02)
        broker_url, store_url = f"{server.url}/0", f"{server.url}/1"
        env = worker_env(fake, broker_url, store_url, CIO_TEST_VISIBILITY="10",
                         CIO_RETRY_BACKOFF_BASE="0.2", CIO_RETRY_BACKOFF_MAX="1", CIO_MAX_RETRIES="30")
        producer = Celery("producer", broker=broker_url, set_as_current=False)
        producer.conf.update(cio_redis_url=store_url, broker_transport_options={"visibility_timeout": 10})
        import cio_celery.tasks  # noqa: F401

        producer.finalize(auto=True)
        track = producer.tasks["cio_celery.track"]
        worker = WorkerProcess(env, concurrency=2, name="restart").start(broker_url)
        try:
            for i in range(n_ops):
                track.delay(f"user-{i % 10}", "ordered", {"seq": i})
            wait_until(lambda: len(fake.applied) >= 40, timeout=30, what="deliveries to start")
            server.stop()
            time.sleep(2.0)
            server.start()
            wait_until(lambda: len({a.json["data"]["seq"] for a in fake.applied}) == n_ops, timeout=90,
                       what=f"all {n_ops} operations to be delivered after the restart")
            assert worker.proc is not None and worker.proc.poll() is None, "the worker crashed"
            seqs = sorted(a.json["data"]["seq"] for a in fake.applied)
            assert seqs == list(range(n_ops)), "each operation applied exactly once"
            dupes = fake.stats["duplicates_ignored"]
            print(f"\nredis restart: {n_ops} delivered, {dupes} duplicate requests dropped by event id")
        finally:
            worker.stop()
