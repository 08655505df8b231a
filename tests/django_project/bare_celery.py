"""A second Celery app without cio_* configuration, for ``CIO_CELERY['celery_app']`` in the checks tests.

``set_as_current=False``: importing it must not replace the session app the worker runs.
"""

from __future__ import annotations

from celery import Celery

app = Celery("django_project_bare", broker="memory://", set_as_current=False, fixups=[])
