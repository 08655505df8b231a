"""The Celery app that `celery -A tests.cli_app cio ...` loads in the CLI tests (configured by environment).

``CELERY_BROKER_URL`` is the broker; the ``CIO_*`` variables (``CIO_REDIS_URL``, ``CIO_SPOOL_DIR``
...) are read by cio_celery's settings as in any deployment. Short connection timeouts, so a
test pointing it at a closed port fails fast.
"""

from __future__ import annotations

import os

from celery import Celery

# Not the process's current app: the CLI takes it from -A, and the other tests' session app stays current.
app = Celery("cio_cli_test", broker=os.environ["CELERY_BROKER_URL"], include=["cio_celery.tasks"],
             set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=False,
    broker_connection_timeout=1.0,
    broker_transport_options={"socket_connect_timeout": 1.0, "visibility_timeout": 3600},
)
