"""The Celery app that `celery worker` subprocesses of the test-suite run (configured by env)."""

from __future__ import annotations

import os

from celery import Celery

from cio_celery.checks import recommended_celery_config

app = Celery("cio_test_worker", broker=os.environ["CELERY_BROKER_URL"], include=["cio_celery.tasks"])
# The configuration the docs tell users to apply, with the test's shorter clocks.
config = recommended_celery_config(visibility_timeout=float(os.environ.get("CIO_TEST_VISIBILITY", "3600")))
config["broker_transport_options"].update(
    # kombu 5.7 sweeps abandoned unacked messages every interval x throttle (10 x 10 s by default).
    unacked_restore_interval=int(os.environ.get("CIO_TEST_RESTORE_INTERVAL", "1")),
    unacked_restore_throttle=int(os.environ.get("CIO_TEST_RESTORE_THROTTLE", "1")),
)
config["worker_prefetch_multiplier"] = int(os.environ.get("CIO_TEST_PREFETCH", "1"))
app.conf.update(config, worker_send_task_events=os.environ.get("CIO_TEST_EVENTS") == "1")
