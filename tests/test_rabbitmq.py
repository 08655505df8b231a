"""RabbitMQ as the broker, Redis as the store: the test's own RabbitMQ node (tests/rabbitmq.py),
real `celery worker` subprocesses with the recommended configuration, the fake Customer.io.

Skipped, with the reason, where ``rabbitmq-server`` is not installed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import amqp
import pytest
from celery import Celery

import cio_celery.tasks  # noqa: F401  (registers the shared tasks)
from cio_celery.checks import check_configuration, recommended_celery_config
from cio_celery.exceptions import ValidationError
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.rabbitmq import RabbitMQNode, skip_without_rabbitmq
from tests.test_tasks import CASES
from tests.workers import WorkerProcess, worker_env

pytestmark = pytest.mark.slow  # an Erlang VM per module, worker subprocesses


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQNode]:
    skip_without_rabbitmq()
    with RabbitMQNode() as node:
        yield node


@pytest.fixture()
def store() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture()
def fake() -> Iterator[FakeCustomerIO]:
    with FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak") as server:
        yield server


def producer_for(broker_url: str, env: dict[str, str], tmp_path: Any, **conf: Any) -> Celery:
    """The app side: the recommended RabbitMQ configuration and the workers' cio settings."""
    app = Celery("rabbitmq-producer", broker=broker_url, set_as_current=False)
    cio = {k.lower(): v for k, v in env.items() if k.startswith("CIO_") and not k.startswith("CIO_TEST")}
    app.conf.update(recommended_celery_config(transport=broker_url), **cio, cio_spool_dir=str(tmp_path / "spool"),
                    **conf)
    app.finalize(auto=True)
    return app


def errors(app: Celery) -> list[str]:
    return [p.setting for p in check_configuration(app) if p.severity == "error"]


def configuration_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_text().splitlines() if "cio_celery configuration" in line]


def publish_confirmed(node: RabbitMQNode, queue: str, n: int) -> None:
    """``n`` persistent messages to a durable queue, each publish waiting for RabbitMQ's confirm."""
    conn = amqp.Connection(f"127.0.0.1:{node.port}", userid="guest", password="guest",
                           confirm_publish=True)
    conn.connect()
    try:
        channel = conn.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False)
        for i in range(n):
            channel.basic_publish(amqp.Message(str(i), delivery_mode=2), routing_key=queue)
    finally:
        conn.close()


def test_the_node_keeps_durable_queues_and_confirmed_messages_over_a_restart_and_a_crash(
    rabbitmq: RabbitMQNode,
) -> None:
    publish_confirmed(rabbitmq, "node-test", 10)
    rabbitmq.restart(down_for=0.5)  # SIGTERM: a clean shutdown
    assert rabbitmq.queue_depth("node-test") == 10
    # A crash keeps every confirmed message. (The queue itself must predate the crash by a moment:
    # RabbitMQ 3.10 writes its declaration behind; a queue declared just before a SIGKILL was gone
    # after it in 1 of 6 tries here. Workers declare their queues when they start.)
    publish_confirmed(rabbitmq, "node-test", 10)
    rabbitmq.restart(kill=True)
    assert rabbitmq.queue_depth("node-test") == 20
    rabbitmq.delete_queues("node-test")
    assert rabbitmq.starts == 3 and max(rabbitmq.start_seconds) < 30, rabbitmq.start_seconds


def test_every_operation_is_delivered_through_rabbitmq_and_the_worker_reports_no_problem(
    rabbitmq: RabbitMQNode, store: RedisServer, fake: FakeCustomerIO, tmp_path: Any,
) -> None:
    rabbitmq.delete_queues("cio", "cio.send", "cio.fallback")
    env = worker_env(fake, rabbitmq.url, f"{store.url}/0", CIO_RATE_LIMIT_TRACK="0", CIO_RATE_LIMIT_TRANSACTIONAL="0")
    worker = WorkerProcess(env, concurrency=2, name="rabbitmq-ops", log_dir=tmp_path).start(rabbitmq.url)
    try:
        app = producer_for(rabbitmq.url, env, tmp_path)
        assert check_configuration(app) == []
        for name, args, kwargs, *_ in CASES:
            app.tasks[f"cio_celery.{name}"].delay(*args, **kwargs)
        requests = fake.wait_for_requests(len(CASES), timeout=60)
        time.sleep(1.0)  # nothing more arrives
        log = worker.log_text()
    finally:
        worker.stop()
    assert len(fake.requests) == len(CASES), [r.path for r in fake.requests]
    assert sorted((r.method, r.path) for r in requests) == sorted((c[3], c[4]) for c in CASES)
    assert all(r.status == 200 for r in requests)
    assert len({c[0] for c in CASES}) == 18
    # The recommended configuration on RabbitMQ: the start-up checks find nothing to report.
    assert "cio_celery configuration" not in log, configuration_lines(worker)
    assert "ready." in log


def test_a_worker_without_publisher_confirms_names_the_setting_at_start(
    rabbitmq: RabbitMQNode, store: RedisServer, fake: FakeCustomerIO, tmp_path: Any,
) -> None:
    rabbitmq.delete_queues("cio", "cio.send", "cio.fallback")
    env = worker_env(fake, rabbitmq.url, f"{store.url}/0", CIO_TEST_NO_CONFIRMS="1")
    worker = WorkerProcess(env, concurrency=1, name="rabbitmq-noconfirm", log_dir=tmp_path).start(rabbitmq.url)
    try:
        deadline = time.monotonic() + 20
        while not configuration_lines(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        lines = configuration_lines(worker)
    finally:
        worker.stop()
    assert len(lines) == 1, lines
    assert "broker_transport_options.confirm_publish: is off" in lines[0] and "(error)" in lines[0]
    assert "visibility_timeout" not in lines[0] and "appendonly" not in lines[0]


def test_quorum_queues_on_topic_exchanges_deliver_retries_through_native_delayed_delivery(
    rabbitmq: RabbitMQNode, store: RedisServer, fake: FakeCustomerIO, tmp_path: Any,
) -> None:
    """docs/rabbitmq.md's quorum setup: no global QoS, countdowns in RabbitMQ's delay queues."""
    if not hasattr(Celery().conf, "task_create_missing_queue_exchange_type"):
        pytest.skip("Celery without task_create_missing_queue_exchange_type (5.6+)")
    rabbitmq.delete_queues("cio", "cio.send", "cio.fallback", exchanges=True)  # the other tests' are direct
    env = worker_env(fake, rabbitmq.url, f"{store.url}/0", CIO_TEST_QUORUM="1", CIO_RATE_LIMIT_TRACK="0",
                     CIO_RETRY_BACKOFF_BASE="2", CIO_RETRY_BACKOFF_MAX="3")
    worker = WorkerProcess(env, concurrency=1, name="rabbitmq-quorum", log_dir=tmp_path).start(rabbitmq.url)
    try:
        app = producer_for(rabbitmq.url, env, tmp_path, task_create_missing_queue_type="quorum",
                           task_create_missing_queue_exchange_type="topic")
        assert check_configuration(app) == []
        fake.fail_next(status=500, count=2)
        app.tasks["cio_celery.identify"].delay("user-1", plan="pro")
        fake.wait_for_applied(1, timeout=60)
        time.sleep(0.5)
        log = worker.log_text()
    finally:
        worker.stop()
    assert [r.status for r in fake.requests] == [500, 500, 200]
    assert "Global QoS is disabled" in log
    assert "cio_celery configuration" not in log, configuration_lines(worker)
    # The queue is a quorum queue (a classic declaration is refused), and Celery's delay queues exist.
    conn = rabbitmq.connection()
    try:
        with pytest.raises(amqp.exceptions.PreconditionFailed, match="x-queue-type"):
            conn.channel().queue_declare("cio", durable=True, auto_delete=False)
        for level in (0, 27):
            conn.channel().queue_declare(f"celery_delayed_{level}", passive=True)  # NotFound if missing
    finally:
        conn.close()
    rabbitmq.delete_queues("cio", "cio.send", "cio.fallback", exchanges=True)


def test_a_countdown_held_past_consumer_timeout_stops_the_worker_and_is_applied_once_after(
    store: RedisServer, fake: FakeCustomerIO, tmp_path: Any,
) -> None:
    """Why the check compares the countdowns with consumer_timeout: RabbitMQ closes the channel of a
    worker holding a countdown message longer than that, and Celery's worker stops on it."""
    skip_without_rabbitmq()
    with RabbitMQNode(consumer_timeout_ms=3000, channel_tick_ms=200) as node:
        env = worker_env(fake, node.url, f"{store.url}/0", CIO_TASK_TIME_LIMIT="1", CIO_TIMEOUT="0.5",
                         CIO_TEST_VISIBILITY="10")
        worker = WorkerProcess(env, concurrency=1, name="rabbitmq-ct", log_dir=tmp_path).start(node.url)
        try:
            declared = {"confirm_publish": True, "consumer_timeout": 3.0}
            app = producer_for(node.url, env, tmp_path, cio_visibility_timeout=10.0,
                               broker_transport_options=declared)
            # The package's own countdowns (at most 1 s) plus one attempt (1 s) stay below 3 s ...
            assert errors(app) == []
            # ... countdowns of up to 3240 s would not.
            longer = producer_for(node.url, env, tmp_path, cio_visibility_timeout=3600.0,
                                  broker_transport_options=declared)
            assert errors(longer) == ["cio_visibility_timeout"]
            # A caller's countdown of 8 s is refused at enqueue by the app whose settings fit the
            # broker (max_countdown is below consumer_timeout) ...
            with pytest.raises(ValidationError, match="countdown is 8 s away"):
                app.tasks["cio_celery.track"].apply_async(("user-1", "held", {"seq": 1}), countdown=8)
            # ... and what it prevents, shown through the app that declared a longer visibility
            # timeout: the worker holds the message, RabbitMQ times the delivery out after 3 s.
            published = time.monotonic()
            longer.tasks["cio_celery.track"].apply_async(("user-1", "held", {"seq": 1}), countdown=8)
            assert worker.proc is not None
            worker.proc.wait(20)
            stopped_after = time.monotonic() - published
            log = worker.log_text()
            assert fake.requests == []
            # Restarted (as a supervisor would), the worker gets the message back and applies it once.
            # After its countdown: restarted before it, the worker holds the message again, and a
            # countdown ending within ms of the new delivery's 3 s timeout is a race (it lost it on
            # a fast machine: task d44c46c5 due at 21:42:52.3, the timeout at 52.355 stopped the
            # restarted worker as well; the message went back to RabbitMQ, not lost).
            worker.stop()
            time.sleep(max(0.0, published + 8.5 - time.monotonic()))
            worker.start(node.url)
            fake.wait_for_requests(1, timeout=30)
            time.sleep(1.0)
        finally:
            worker.stop()
    assert "Unrecoverable error: PreconditionFailed" in log and "timed out" in log, log[-3000:]
    assert 3.0 <= stopped_after < 10.0
    assert len(fake.applied) == 1 and len(fake.requests) == 1
