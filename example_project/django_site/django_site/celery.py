"""The Celery app of the example site, as in Celery's "First steps with Django".

``celery -A django_site worker -Q cio,cio.send,cio.fallback`` runs it; Celery's Django fix-up calls
``django.setup()`` in the worker, and ``cio_celery.contrib.django`` then applies ``CIO_CELERY``.
"""

from __future__ import annotations

import os

from celery import Celery

from cio_celery.checks import recommended_celery_config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_site.settings")

app = Celery("django_site")
# CELERY_* Django settings (CELERY_BROKER_URL ...) become Celery settings (broker_url ...).
app.config_from_object("django.conf:settings", namespace="CELERY")
# Late acks, prefetch 1, a visibility timeout above the longest countdown, and so on.
# It replaces broker_transport_options: merge your own keys into it if you have any.
app.conf.update(recommended_celery_config())
# Finds cio_celery.contrib.django.tasks, which registers every Customer.io operation task.
app.autodiscover_tasks()
