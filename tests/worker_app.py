"""The Celery app that `celery worker` subprocesses of the test-suite run (configured by env)."""

from __future__ import annotations

import os

from celery import Celery

from cio_celery.checks import recommended_celery_config

BROKER_URL = os.environ["CELERY_BROKER_URL"]
RABBITMQ = BROKER_URL.split("://", 1)[0].split("+")[0] in {"amqp", "amqps", "pyamqp"}

app = Celery("cio_test_worker", broker=BROKER_URL, include=["cio_celery.tasks"])
# The configuration the docs tell users to apply, with the test's shorter clocks. On RabbitMQ the
# "visibility timeout" only bounds the package's countdowns (CIO_TEST_VISIBILITY 10: at most 1 s);
# unset there, the recommendation derives it from RabbitMQ's consumer_timeout.
visibility = os.environ.get("CIO_TEST_VISIBILITY", None if RABBITMQ else "3600")
config = recommended_celery_config(visibility_timeout=None if visibility is None else float(visibility),
                                   transport=BROKER_URL)
if not RABBITMQ:
    config["broker_transport_options"].update(
        # kombu 5.7 sweeps abandoned unacked messages every interval x throttle (10 x 10 s by default).
        unacked_restore_interval=int(os.environ.get("CIO_TEST_RESTORE_INTERVAL", "1")),
        unacked_restore_throttle=int(os.environ.get("CIO_TEST_RESTORE_THROTTLE", "1")),
    )
config["worker_prefetch_multiplier"] = int(os.environ.get("CIO_TEST_PREFETCH", "1"))
if os.environ.get("CIO_TEST_NO_CONFIRMS") == "1":  # tests/test_rabbitmq.py: the start-up check names it
    config["broker_transport_options"].pop("confirm_publish", None)
if os.environ.get("CIO_TEST_QUORUM") == "1":  # docs/rabbitmq.md's quorum queues on topic exchanges
    config.update(task_create_missing_queue_type="quorum", task_create_missing_queue_exchange_type="topic")
app.conf.update(config, worker_send_task_events=os.environ.get("CIO_TEST_EVENTS") == "1")
