"""The example site. The Celery app is created here, before Django's apps are ready, so that
``cio_celery.contrib.django`` configures it (Celery's "First steps with Django" pattern)."""

from __future__ import annotations

from .celery import app as celery_app

__all__ = ["celery_app"]
