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
import json
import socket
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
from cio_celery.health import batching_figures
from cio_celery.idempotency import Claims
from cio_celery.settings import build_settings, settings_for_app
from cio_celery.store import redis_for, run_script
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.helpers import applied_by_seq
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
    # The callers' quick client is one per process and store URL: a connection an earlier test's
    # fault killed (kill_after) may still sit in its pool, and the first call would then fail on
    # it before reaching the proxy (and rightly pause batching at enqueue for 30 s). Each test
    # starts on a fresh connection (set-up commands are not counted).
    quick = redis_for(build_settings({"redis_url": rig.proxied_store_url}, environ={}), coalesce.ENQUEUE_STORE_TIMEOUT)
    quick.connection_pool.disconnect()
    yield rig
    rig.proxy.stop_counting()


def wait_applied(r: Rig, n: int, timeout: float = 30.0) -> Counter[int]:
    deadline = time.monotonic() + timeout
    while len(applied_by_seq(r.fake)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a copy applied twice would show by now
    got = applied_by_seq(r.fake)
    assert sorted(got) == list(range(n)), f"applied {sorted(got)}; worker log:\n{r.worker.tail(40)}"
    assert max(got.values()) == 1, f"applied twice: {got.most_common(3)}"
    return got


def test_past_the_limit_delay_appends_to_the_buffer_and_publishes_no_message(r: Rig) -> None:
    producer = r.producer()
    r.past_the_limit()
    r.proxy.start_counting()
    for i in range(50):
        producer.tasks["cio_celery.track"].delay(f"user-{i}", "direct", {"seq": i})
    settings = settings_for_app(producer)
    appended = coalesce.buffered_at_enqueue(settings)
    # Every call asked the store (one script) until one was declined; on a loaded machine the
    # worker's drainer can miss refreshing its lease for a moment, and then a few calls publish.
    assert appended >= 40 and r.enqueue_commands() >= appended, (appended, r.proxy.commands)
    assert batching_figures(settings)["appended_at_enqueue"] == appended  # cio status, Prometheus
    wait_applied(r, 50)
    # The appended ones have no Celery message of their own: each was an item of a batch request.
    items = [i for q in r.fake.requests if q.operation == "batch" for i in q.json["batch"]]
    assert len(items) >= appended
    sent = items + [q.json for q in r.fake.requests if q.operation == "track"]
    assert len(sent) == 50 and len({i["id"] for i in sent}) == 50, "event ids kept, one each"


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


def ask(r: Rig, settings: Any, blob: str = "") -> int:
    """The store's answer to one append (the script itself: 0 declines, 1 appended), so that a
    decline is told apart from a store error (which buffer_at_enqueue also answers with False)."""
    data: dict[str, Any] = {"seq": 99, **({"blob": blob} if blob else {})}
    entry = json.dumps({"operation": "track", "task_id": "t-ask", "kwargs": {"_cio": {"key": "k-ask"}},
                        "args": ["user-99", "x", data, "01JD0000000000000000000099", None]})
    plan = coalesce._plan_for(settings)
    return int(run_script(settings, coalesce._ENQUEUE, plan.keys,
                          [entry, plan.rate, coalesce.COALESCE_MAX, settings.batch_buffer_max_bytes]))


def test_with_the_breaker_open_or_its_state_damaged_the_store_declines(r: Rig) -> None:
    settings = settings_for_app(r.producer())
    r.past_the_limit()
    breaker = Breaker(settings)
    breaker.open()
    assert ask(r, settings) == 0
    r.store.delete(breaker.state_key)
    r.store.set(breaker.state_key, "not a hash")
    assert ask(r, settings) == 0
    r.store.delete(breaker.state_key)
    assert ask(r, settings) == 1
    # The appended entry is drained and applied like any other.
    deadline = time.monotonic() + 20
    while not any(a.operation == "batch:event" for a in r.fake.applied) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [a.json["attributes"]["seq"] for a in r.fake.applied] == [99]


def test_without_a_drainer_for_its_buffer_the_store_declines(r: Rig) -> None:
    # Workers that run with batching off (or none at all) hold no drainer lease for the buffer:
    # here, a producer whose key prefix no worker uses.
    producer = r.producer_with(cio_key_prefix="nodrainer")
    settings = settings_for_app(producer)
    assert settings.key_prefix == "nodrainer"
    now = int(r.store.time()[0])
    r.store.hset("{nodrainer}:coalesce:arrivals", mapping={str(now + d): 1000 for d in range(-1, 30)})
    assert ask(r, settings) == 0
    assert r.store.llen("{nodrainer}:coalesce") == 0
    r.store.set("{nodrainer}:coalesce:drainer", "a-worker", px=5000)  # as a worker's drainer holds it
    assert ask(r, settings) == 1
    assert r.store.llen("{nodrainer}:coalesce") == 1


def test_a_store_that_does_not_answer_costs_a_call_at_most_a_tenth_of_a_second(r: Rig) -> None:
    """A store that accepts connections and never answers (paused, overloaded): the caller's
    check gives up after ENQUEUE_STORE_TIMEOUT and publishes; later calls do not ask."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes connections; nothing ever reads or answers
    try:
        # A time limit of 60 s gives the store client of the workers a 5 s socket timeout:
        # the caller's check must not use it.
        producer = r.producer_with(cio_redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/1",
                                   cio_task_time_limit=60)
        started = time.monotonic()
        producer.tasks["cio_celery.track"].delay("user-0", "silent", {"seq": 0})
        first = time.monotonic() - started
        started = time.monotonic()
        for i in range(1, 10):
            producer.tasks["cio_celery.track"].delay(f"user-{i}", "silent", {"seq": i})
        rest = time.monotonic() - started
    finally:
        silent.close()
    settings = settings_for_app(producer)
    assert coalesce.buffered_at_enqueue(settings) == 0
    assert first < coalesce.ENQUEUE_STORE_TIMEOUT + 0.4, f"the first call took {first:.3f} s"
    assert rest < 1.0, f"nine calls that did not ask the store took {rest:.3f} s"
    assert coalesce._plan_for(settings).not_before - time.monotonic() > 20, "it stopped asking"
    wait_applied(r, 10, timeout=60)


def test_past_the_buffers_byte_cap_the_store_declines_and_counts_what_it_holds(r: Rig) -> None:
    # A buffer nobody drains (a prefix no worker uses, its drainer lease set by hand): entries of
    # about 20 KB fill the 64 KiB cap on the fourth; the bytes key counts exactly what is held.
    producer = r.producer_with(cio_key_prefix="capped", cio_batch_buffer_max_bytes=65536)
    settings = settings_for_app(producer)
    now = int(r.store.time()[0])
    r.store.hset("{capped}:coalesce:arrivals", mapping={str(now + d): 1000 for d in range(-1, 30)})
    r.store.set("{capped}:coalesce:drainer", "a-worker", px=30_000)
    answers = [ask(r, settings, blob="x" * 20_000) for _ in range(5)]
    assert answers == [1, 1, 1, 0, 0]
    held = r.store.lrange("{capped}:coalesce", 0, -1)
    assert len(held) == 3
    assert int(r.store.get("{capped}:coalesce:bytes")) == sum(len(e) for e in held) <= 65536
    assert ask(r, settings) == 1  # a small entry still fits
    # Past the cap .delay() publishes as usual: nothing is lost.
    assert not coalesce.buffer_at_enqueue(settings, "track", "t-big", ["user-1", "x", {"blob": "y" * 20_000}], {})
