"""Django integration: ``INSTALLED_APPS += ["cio_celery.contrib.django"]``.

- ``CIO_CELERY = {...}`` in Django settings configures cio_celery (keys are cio_celery
  setting names, plus ``celery_app``, ``redis_alias``, ``health_max_dead_letters`` and
  ``health_max_fallback_depth``); the app config applies it to the Celery app when Django
  starts, in web processes and in ``celery worker`` alike (Celery's Django fix-up runs
  ``django.setup()`` in the worker).
- System checks (tag ``cio_celery``) report missing, unknown and invalid keys, a bad
  ``redis_alias``, and the Celery configuration problems of :func:`cio_celery.checks.check_configuration`.
- :func:`cio_celery.contrib.django.views.health` (``cio_celery.contrib.django.urls``) answers
  the health report as JSON, 200 when healthy, 503 when not.

Nothing here imports Django models: importing this package is safe before ``django.setup()``.
"""

from __future__ import annotations

from .conf import (
    DJANGO_ONLY_KEYS,
    SETTING_NAME,
    DjangoConfig,
    build_django_settings,
    celery_app,
    cio_settings,
    configure_from_django,
    read_config,
)

__all__ = [
    "DJANGO_ONLY_KEYS",
    "SETTING_NAME",
    "DjangoConfig",
    "build_django_settings",
    "celery_app",
    "cio_settings",
    "configure_from_django",
    "read_config",
]
