"""The Celery app `celery -A tests.cli_app cio ...` runs in the CLI tests (configured by environment)."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cio_cli_test", broker=os.environ["CELERY_BROKER_URL"], include=["cio_celery.tasks"])
app.conf.update(broker_connection_retry_on_startup=False, broker_connection_timeout=1.0,
                broker_transport_options={"socket_connect_timeout": 1.0})
