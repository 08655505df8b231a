"""Found by ``app.autodiscover_tasks()``: importing it registers every cio_celery operation task.

With ``cio_celery.contrib.django`` in ``INSTALLED_APPS``, Celery's "First steps with Django"
pattern needs no ``include=["cio_celery.tasks"]``.
"""

from __future__ import annotations

from cio_celery.tasks import *  # noqa: F403 - the tasks are what this module is for
from cio_celery.tasks import __all__ as __all__
