"""The smallest Celery app using cio_celery: settings come from CIO_* environment variables."""

from __future__ import annotations

import os

from celery import Celery

from cio_celery.checks import recommended_celery_config

app = Celery(
    "example",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    include=["cio_celery.tasks"],
)
app.conf.update(
    recommended_celery_config(),  # late acks, prefetch 1, visibility timeout, unacked sweep
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)
