"""The delivery ledger closes the Redis transport's BRPOP window end to end.

kombu pops a message with BRPOP and records it as unacknowledged in a second command; a Redis
restart between the two loses it (traced in the chaos suite). These tests take a message out of
its queue exactly as that window does (popped, recorded nowhere) and show that the ledger's
sweeper republishes it, once; and that a backlog older than the grace, still in its queue, is
left alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from cio_celery.idempotency import Claims
from cio_celery.ledger import Ledger
from cio_celery.settings import settings_for_app
from cio_celery.store import key
from cio_celery.testing import FakeCustomerIO
from tests.helpers import wait_until
from tests.workers import WorkerProcess, flush, worker_env

pytestmark = pytest.mark.slow

ENV = {"CIO_TEST_VISIBILITY": "10", "CIO_FALLBACK_RELEASE_INTERVAL": "0.2", "CIO_RATE_LIMIT_TRACK": "0"}


@pytest.fixture()
def rig(redis_base_url: str) -> Iterator[dict[str, Any]]:
    broker_url, store_url = f"{redis_base_url}/5", f"{redis_base_url}/6"
    flush(broker_url)
    flush(store_url)
    fake = FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak").start()
    env = worker_env(fake, broker_url, store_url, **ENV)
    producer = Celery("ledger-producer", broker=broker_url, set_as_current=False)
    producer.conf.update({k.lower(): v for k, v in env.items() if k.startswith("CIO_") and "TEST" not in k},
                         broker_transport_options={"visibility_timeout": 10})
    import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

    producer.finalize(auto=True)
    worker = WorkerProcess(env, concurrency=2, name="ledger")
    try:
        yield {"fake": fake, "producer": producer, "worker": worker, "broker": redis.Redis.from_url(broker_url),
               "broker_url": broker_url}
    finally:
        worker.stop()
        fake.stop()


def test_a_message_lost_between_brpop_and_the_unacked_record_is_republished_once(rig: dict[str, Any]) -> None:
    fake: FakeCustomerIO = rig["fake"]
    producer: Celery = rig["producer"]
    broker: redis.Redis = rig["broker"]
    track = producer.tasks["cio_celery.track"]
    ids = [track.delay(f"user-{i}", "in_transit", {"seq": i}).id for i in range(3)]
    ledger = Ledger(settings_for_app(producer))
    # The producer's writer thread records publishes in the background: wait for all three
    # before opening the window, so that the lost one is certainly in the ledger.
    wait_until(lambda: ledger.depth() == 3, timeout=5, what="the three publishes to be recorded")
    # The window: the oldest message is popped and recorded nowhere, as when Redis stops
    # between kombu's BRPOP and its unacked record.
    lost = json.loads(broker.rpop("cio"))  # type: ignore[arg-type]
    assert lost["headers"]["id"] == ids[0]
    assert broker.hlen("unacked") == 0
    started = time.monotonic()
    rig["worker"].start(rig["broker_url"])
    fake.wait_for_applied(2, timeout=15)
    applied = wait_until(lambda: len(fake.applied) == 3 and fake.applied, timeout=ledger.grace + 20,
                         what="the lost operation to be republished by the ledger")
    took = time.monotonic() - started
    time.sleep(1.0)
    assert sorted(a.json["data"]["seq"] for a in applied) == [0, 1, 2]
    assert len(fake.requests) == 3, "republished once, delivered once"
    # The done mark and the ledger's clearing follow Customer.io's answer, not its receipt.
    wait_until(lambda: ledger.depth() == 0, timeout=5, what="every ended operation to leave the ledger")
    wait_until(lambda: Claims(settings_for_app(producer)).state_of("track", ids[0]) == "done", timeout=5,
               what="the republished operation's done mark")
    assert "ledger republished 1 operations" in rig["worker"].log_text()
    print(f"\nledger: the lost operation was delivered {took:.1f} s after the worker started "
          f"(grace {ledger.grace:.0f} s)")


def test_a_backlog_older_than_the_grace_is_not_republished(rig: dict[str, Any]) -> None:
    fake: FakeCustomerIO = rig["fake"]
    producer: Celery = rig["producer"]
    track = producer.tasks["cio_celery.track"]
    n = 60
    for i in range(n):
        track.delay(f"user-{i}", "backlog", {"seq": i})
    ledger = Ledger(settings_for_app(producer))
    time.sleep(ledger.grace + 1)  # every entry is overdue, and every message still queued
    fake.set_latency(0.1)  # the backlog drains over several sweeps
    rig["worker"].start(rig["broker_url"])
    wait_until(lambda: len(fake.applied) == n, timeout=60, what="the backlog to drain")
    time.sleep(1.0)
    assert len(fake.requests) == n, "no queued message was republished"
    assert "ledger republished" not in rig["worker"].log_text()
    assert ledger.depth() == 0


def test_a_batch_is_one_record_and_a_lost_batch_is_republished_whole(rig: dict[str, Any]) -> None:
    """A batch message carries one ledger record (not one per item); lost in the window, the
    sweeper republishes it with its task id and every item is applied once."""
    from cio_celery.batching import BATCH_TASK
    from cio_celery.meta import internal_publish
    from cio_celery.ulid import new_ulid

    fake: FakeCustomerIO = rig["fake"]
    producer: Celery = rig["producer"]
    broker: redis.Redis = rig["broker"]
    settings = settings_for_app(producer)
    group = [{"operation": "track", "task_id": f"item-{i}", "args": [f"user-{i}", "batched", {"seq": i},
                                                                       new_ulid(), None], "kwargs": {}}
             for i in range(5)]
    with internal_publish():
        batch_id = producer.tasks[BATCH_TASK].apply_async(args=[group], queue=settings.fallback_queue).id
    ledger = Ledger(settings)
    assert ledger.depth() == 1, "one record for the batch message"
    client = redis.Redis.from_url(str(settings.redis_url))
    assert client.zscore(key(settings, "ledger", "due"), batch_id) is not None
    lost = json.loads(broker.rpop(settings.fallback_queue))  # type: ignore[arg-type]
    assert lost["headers"]["id"] == batch_id
    rig["worker"].start(rig["broker_url"])
    applied = wait_until(lambda: len(fake.applied) == 5 and fake.applied, timeout=ledger.grace + 20,
                         what="the lost batch to be republished by the ledger")
    time.sleep(1.0)
    assert sorted(a.json["attributes"]["seq"] for a in applied) == [0, 1, 2, 3, 4]
    assert len(fake.applied) == 5, "each item applied once"
    assert wait_until(lambda: ledger.depth() == 0, timeout=5, what="the batch's record to be cleared")
    assert "ledger republished 1 operations" in rig["worker"].log_text()


def test_the_sweeper_forgets_an_ended_entry_but_not_one_recorded_again(redis_base_url: str) -> None:
    """An entry that ended loses its due time; one recorded again after the sweeper saw it
    missing (parked, then released) keeps it, or it would never be swept again."""
    from cio_celery.ledger import _FORGET
    from cio_celery.settings import build_settings
    from cio_celery.store import run_script

    store_url = f"{redis_base_url}/12"
    flush(store_url)
    settings = build_settings({"redis_url": store_url}, environ={})
    ledger = Ledger(settings)
    client = redis.Redis.from_url(store_url)
    for task_id in ("ended", "again"):
        ledger.record_now([ledger.record_message_call("cio_celery.track", task_id, [], {}, "cio", time.time())])
    assert ledger.depth() == 2
    client.hdel(ledger._entries, "ended")  # cleared by its outcome; "again" was recorded anew
    for task_id in ("ended", "again"):
        run_script(settings, _FORGET, [ledger._entries, ledger._due], [task_id])
    assert client.zscore(ledger._due, "ended") is None
    assert client.zscore(ledger._due, "again") is not None
    assert ledger.depth() == 1
