"""The Celery app that `celery worker` subprocesses of the test-suite run (configured by env)."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cio_test_worker", broker=os.environ["CELERY_BROKER_URL"], include=["cio_celery.tasks"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("CIO_TEST_VISIBILITY", "3600")),
        # kombu 5.7 sweeps abandoned unacked messages every interval x throttle (10 x 10 s).
        "unacked_restore_interval": int(os.environ.get("CIO_TEST_RESTORE_INTERVAL", "10")),
        "unacked_restore_throttle": int(os.environ.get("CIO_TEST_RESTORE_THROTTLE", "10")),
    },
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_send_task_events=os.environ.get("CIO_TEST_EVENTS") == "1",
)
