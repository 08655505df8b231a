"""Batching at enqueue (cio_celery/coalesce.py, ``buffer_at_enqueue``): past the rate limit,
``.delay()`` of a batchable operation appends it to the batching buffer in the store instead of
publishing one Celery message; below the limit, with options, with the breaker not closed, or
when the store fails, it publishes as usual. Either way the operation is applied once.

A real redis-server (broker and store), a real ``celery worker`` draining the buffer, the fake
Customer.io, and a RESP proxy between the producer and its store that counts the producer's
store commands and fails the one a test names.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from cio_celery import coalesce
from cio_celery.breaker import Breaker
from cio_celery.deadletters import DeadLetters
from cio_celery.idempotency import Claims
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.resp_proxy import Fault, RespProxy
from tests.workers import WorkerProcess, worker_env

pytestmark = [pytest.mark.slow]

ENV = {
    "CIO_RATE_LIMIT_TRACK": "100",
    "CIO_TASK_TIME_LIMIT": "2",  # the store client's socket timeout is a fifth of it: 0.4 s
    "CIO_TIMEOUT": "0.5",
    "CIO_TEST_VISIBILITY": "10",
    "CIO_BATCH_LINGER": "0.1",
    "CIO_BATCH_MIN_SIZE": "20",
    "CIO_BREAKER_OPEN_BASE": "1",
    "CIO_BREAKER_OPEN_MAX": "1",
    "CIO_FALLBACK_RELEASE_INTERVAL": "0.2",
}
ENQUEUE_SHA = hashlib.sha1(coalesce._ENQUEUE.encode()).hexdigest()[:8]


@dataclass
class Rig:
    server: RedisServer
    fake: FakeCustomerIO
    proxy: RespProxy
    worker: WorkerProcess
    store: redis.Redis
    broker_url: str
    proxied_store_url: str
    spool: Path

    def producer_with(self, **conf: Any) -> Celery:
        app = self.producer()
        app.conf.update(conf)
        return app

    def producer(self) -> Celery:
        """A new producer app (its own settings object, so its own enqueue plan)."""
        app = Celery("enqueue-buffer-producer", broker=self.broker_url, set_as_current=False)
        conf: dict[str, Any] = {k.lower(): v for k, v in ENV.items() if not k.startswith("CIO_TEST")}
        conf.update(cio_redis_url=self.proxied_store_url, cio_spool_dir=str(self.spool),
                    cio_site_id="s", cio_track_api_key="tk", cio_app_api_key="ak",
                    broker_connection_retry_on_startup=True)
        app.conf.update(conf)
        import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

        app.finalize(auto=True)
        return app

    def past_the_limit(self) -> None:
        """The store's view after a busy second: more batchable arrivals than single requests carry."""
        now = int(self.store.time()[0])
        self.store.hset("{cio}:coalesce:arrivals", mapping={str(now + d): 1000 for d in range(-1, 30)})

    def enqueue_commands(self) -> int:
        return sum(1 for c in self.proxy.commands if c == f"EVALSHA {ENQUEUE_SHA}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(appendonly=True))
        fake = stack.enter_context(FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak"))
        proxy = RespProxy(server.port)
        stack.callback(proxy.close)
        broker_url, store_url = f"{server.url}/0", f"{server.url}/1"
        env = worker_env(fake, broker_url, store_url, **ENV)
        worker = WorkerProcess(env, concurrency=2, name="enqueue-buffer",
                               log_dir=tmp_path_factory.mktemp("enqueue-buffer-logs"))
        worker.start(broker_url)
        stack.callback(worker.stop, 20)
        yield Rig(server, fake, proxy, worker, redis.Redis.from_url(store_url), broker_url,
                  f"redis://127.0.0.1:{proxy.port}/1", tmp_path_factory.mktemp("enqueue-buffer-spool"))


@pytest.fixture()
def r(rig: Rig) -> Iterator[Rig]:
    rig.store.flushdb()
    rig.store.script_load(coalesce._ENQUEUE)  # each call is one EVALSHA, never NOSCRIPT and again
    rig.fake.clear()
    rig.fake.clear_faults()
    rig.fake.set_latency(0.0)
    # The worker's drainer takes its lease a moment after the worker is ready (and again after
    # the flush): until then the store rightly declines every append.
    deadline = time.monotonic() + 10
    while not rig.store.exists("{cio}:coalesce:drainer") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.store.exists("{cio}:coalesce:drainer"), rig.worker.tail(20)
    yield rig
    rig.proxy.stop_counting()


def applied(fake: FakeCustomerIO) -> Counter[int]:
    out: Counter[int] = Counter()
    for a in fake.applied:
        body = a.json or {}
        if a.operation == "track":
            out[int(body["data"]["seq"])] += 1
        elif a.operation == "batch:event":
            out[int(body["attributes"]["seq"])] += 1
    return out


def wait_applied(r: Rig, n: int, timeout: float = 30.0) -> Counter[int]:
    deadline = time.monotonic() + timeout
    while len(applied(r.fake)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a copy applied twice would show by now
    got = applied(r.fake)
    assert sorted(got) == list(range(n)), f"applied {sorted(got)}; worker log:\n{r.worker.tail(40)}"
    assert max(got.values()) == 1, f"applied twice: {got.most_common(3)}"
    return got


def test_past_the_limit_delay_appends_to_the_buffer_and_publishes_no_message(r: Rig) -> None:
    producer = r.producer()
    r.past_the_limit()
    r.proxy.start_counting()
    for i in range(50):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "direct", {"seq": i})
    assert r.enqueue_commands() == 50, r.proxy.commands
    assert coalesce.buffered_at_enqueue(settings_for_app(producer)) == 50
    wait_applied(r, 50)
    # No Celery message of their own: every one was applied as an item of a batch request.
    assert {q.operation for q in r.fake.requests} == {"batch"}
    items = [i for q in r.fake.requests for i in q.json["batch"]]
    assert len(items) == 50 and len({i["id"] for i in items}) == 50, "event ids kept, one each"


def test_below_the_limit_it_publishes_and_asks_the_store_once_a_tenth_of_a_second(r: Rig) -> None:
    producer = r.producer()
    r.proxy.start_counting()
    started = time.monotonic()
    for i in range(20):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "light", {"seq": i})
    elapsed = time.monotonic() - started
    asked = r.enqueue_commands()
    assert 1 <= asked <= 1 + int(elapsed / coalesce.ENQUEUE_RECHECK), (asked, elapsed)
    assert coalesce.buffered_at_enqueue(settings_for_app(producer)) == 0, "each published its message"
    wait_applied(r, 20)


def test_an_append_whose_answer_is_lost_is_published_too_and_applied_once(r: Rig) -> None:
    producer = r.producer()
    r.past_the_limit()
    # The append runs in Redis; its answer never comes back (the producer's store call times out).
    r.proxy.start_counting(Fault(at=1, mode="kill_after"))
    producer.tasks["cio_celery.track"].delay("user-0", "lost-answer", {"seq": 0})
    for i in range(1, 5):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "lost-answer", {"seq": i})
    assert r.enqueue_commands() == 1, "after a failure the producer publishes without asking"
    assert coalesce.buffered_at_enqueue(settings_for_app(producer)) == 0
    wait_applied(r, 5)
    settings = settings_for_app(producer)
    assert DeadLetters(settings).count() == 0
    # Both copies of seq 0 (the append that ran and the message published after it) reached a
    # worker; the claim let one through and suppressed the other.
    deadline = time.monotonic() + 10
    while sum(Claims(settings).suppressed().values()) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sum(Claims(settings).suppressed().values()) == 1, r.worker.tail(30)


def test_a_store_error_publishes_as_usual_and_pauses_batching_at_enqueue(r: Rig) -> None:
    producer = r.producer()
    r.past_the_limit()
    r.proxy.start_counting(Fault(at=1, mode="error"))
    for i in range(10):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "store-error", {"seq": i})
    assert r.enqueue_commands() == 1
    assert coalesce.buffered_at_enqueue(settings_for_app(producer)) == 0
    wait_applied(r, 10)


def test_a_call_with_options_gets_its_own_message(r: Rig) -> None:
    producer = r.producer()
    r.past_the_limit()
    r.proxy.start_counting()
    track = producer.tasks["cio_celery.track"]
    track.apply_async(("user-0", "opts", {"seq": 0}), countdown=0.05)
    track.apply_async(("user-1", "opts", {"seq": 1}), queue="cio")
    track.apply_async(("user-2", "opts", {"seq": 2}), idempotency_key="k-2")  # a key is no option
    assert r.enqueue_commands() == 1  # the third call's
    assert coalesce.buffered_at_enqueue(settings_for_app(producer)) == 1
    wait_applied(r, 3)


def test_with_the_breaker_open_or_its_state_damaged_the_store_declines(r: Rig) -> None:
    producer = r.producer()
    settings = settings_for_app(producer)
    r.past_the_limit()
    breaker = Breaker(settings)
    breaker.open()
    args, kwargs = ["user-0", "x", {"seq": 0}, "01JD0000000000000000000000", None], {"_cio": {"key": "k"}}
    assert not coalesce.buffer_at_enqueue(settings, "track", "t-open", args, kwargs)
    r.store.delete(breaker.state_key)
    r.store.set(breaker.state_key, "not a hash")
    producer2 = r.producer()  # a new plan: the one above waits a tenth of a second
    assert not coalesce.buffer_at_enqueue(settings_for_app(producer2), "track", "t-bad", args, kwargs)
    r.store.delete(breaker.state_key)
    producer3 = r.producer()
    assert coalesce.buffer_at_enqueue(settings_for_app(producer3), "track", "t-closed", args, kwargs)
    assert r.store.llen("{cio}:coalesce") + len(r.fake.requests) >= 1


def test_without_a_drainer_for_its_buffer_the_store_declines(r: Rig) -> None:
    # Workers that run with batching off (or none at all) hold no drainer lease for the buffer:
    # here, a producer whose key prefix no worker uses.
    producer = r.producer_with(cio_key_prefix="nodrainer")
    settings = settings_for_app(producer)
    assert settings.key_prefix == "nodrainer"
    now = int(r.store.time()[0])
    r.store.hset("{nodrainer}:coalesce:arrivals", mapping={str(now + d): 1000 for d in range(-1, 30)})
    args, kwargs = ["user-0", "x", {"seq": 0}, "01JD0000000000000000000000", None], {"_cio": {"key": "k"}}
    assert not coalesce.buffer_at_enqueue(settings, "track", "t-none", args, kwargs)
    assert r.store.llen("{nodrainer}:coalesce") == 0
    r.store.set("{nodrainer}:coalesce:drainer", "a-worker", px=5000)  # as a worker's drainer holds it
    assert coalesce.buffer_at_enqueue(settings_for_app(r.producer_with(cio_key_prefix="nodrainer")),
                                      "track", "t-some", args, kwargs)
    assert r.store.llen("{nodrainer}:coalesce") == 1
