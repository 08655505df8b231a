"""Transactional sends have their own queue (``send_queue``, ``cio.send``): a backlog of batchable
operations in ``cio`` does not delay them. A real ``celery worker`` starts on a backlog already
in the broker, and the order in which the fake Customer.io applied the operations is read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from cio_celery.testing import FakeCustomerIO
from tests.helpers import wait_until
from tests.workers import WorkerProcess, flush, worker_env

pytestmark = pytest.mark.slow

BACKLOG = 300


@pytest.fixture()
def rig(redis_base_url: str) -> Iterator[dict[str, Any]]:
    broker_url, store_url = f"{redis_base_url}/7", f"{redis_base_url}/8"
    flush(broker_url)
    flush(store_url)
    fake = FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak").start()
    workers: list[WorkerProcess] = []
    try:
        yield {"fake": fake, "broker_url": broker_url, "store_url": store_url, "workers": workers,
               "broker": redis.Redis.from_url(broker_url)}
    finally:
        for worker in workers:
            worker.stop()
        fake.stop()


def _producer(env: dict[str, str], broker_url: str) -> Celery:
    producer = Celery("send-queue-producer", broker=broker_url, set_as_current=False)
    producer.conf.update({k.lower(): v for k, v in env.items() if k.startswith("CIO_")})
    import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

    producer.finalize(auto=True)
    return producer


@pytest.mark.parametrize("send_queue", ["cio.send", "cio"])
def test_a_send_does_not_wait_behind_a_track_backlog(rig: dict[str, Any], send_queue: str) -> None:
    """The backlog of 300 ``track`` goes one request each at 100/s (about 3 s); the send is
    applied among the first operations on its own queue, after the whole backlog on a shared one
    (``CIO_SEND_QUEUE=cio``: the contrast, so the test can tell the two apart)."""
    fake: FakeCustomerIO = rig["fake"]
    broker: redis.Redis = rig["broker"]
    env = worker_env(fake, rig["broker_url"], rig["store_url"], CIO_RATE_LIMIT_TRACK="100",
                     CIO_BATCH_COALESCE="0", CIO_SEND_QUEUE=send_queue)
    producer = _producer(env, rig["broker_url"])
    for i in range(BACKLOG):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "backlog", {"seq": i})
    producer.tasks["cio_celery.send_email"].delay(
        {"transactional_message_id": 1, "identifiers": {"id": "user-mail"}, "to": "u@example.com"})
    wait_until(lambda: broker.llen("cio") + broker.llen("cio.send") == BACKLOG + 1, timeout=15,
               what="the operations to be published")
    assert broker.llen("cio.send") == (1 if send_queue == "cio.send" else 0)

    worker = WorkerProcess(env, concurrency=2, name=f"sendq-{send_queue}")
    rig["workers"].append(worker)
    worker.start(rig["broker_url"])
    fake.wait_for_applied(BACKLOG + 1, timeout=60)
    order = [a.operation for a in sorted(fake.applied, key=lambda a: a.applied_at)]
    assert order.count("send_email") == 1 and order.count("track") == BACKLOG
    before = order.index("send_email")
    if send_queue == "cio.send":
        # At most the messages the worker held when it first asked its queues (2 processes).
        assert before < 10, before
    else:
        assert before >= BACKLOG - 10, before  # first in, first out behind the whole backlog
