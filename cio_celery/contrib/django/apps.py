"""The Django app config: applies ``CIO_CELERY`` to the Celery app when Django starts."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed

from cio_celery.exceptions import ConfigurationError

from .conf import SETTING_NAME, alias_problem, configure_from_django, django_key, read_config

__all__ = ["CioCeleryConfig"]

logger = logging.getLogger("cio_celery.contrib.django")


def apply_django_settings() -> bool:
    """Configure the Celery app from ``CIO_CELERY``; log (never raise) what stops it.

    Runs in every process that calls ``django.setup()``: web servers, management commands,
    and ``celery worker`` (through Celery's Django fix-up). The messages name settings,
    never values; ``manage.py check`` reports the same problems with their ids.
    """
    try:
        config = read_config()
        if config.unknown:
            logger.warning(
                "cio_celery: %s has unknown keys (%s), ignored; run `manage.py check`",
                SETTING_NAME, ", ".join(sorted(config.unknown)),
            )
        if config.redis_alias is not None:
            problem = alias_problem(config.redis_alias)
            if problem is not None:
                logger.error("cio_celery: %s %s", django_key("redis_alias"), problem[1])
        configure_from_django()
    except ConfigurationError as exc:
        logger.error(
            "cio_celery: %s %s; the Celery app keeps its settings from the environment "
            "(run `manage.py check`)", exc.setting, exc.problem,
        )
        return False
    except Exception as exc:  # noqa: BLE001 - Django must start whatever CIO_CELERY holds
        logger.error("cio_celery: %s could not be applied (%s); run `manage.py check`", SETTING_NAME,
                     type(exc).__name__)
        return False
    return True


def _on_setting_changed(setting: str = "", **kwargs: Any) -> None:
    """``override_settings(CIO_CELERY=...)`` in tests reconfigures the app, and back on exit."""
    if setting == SETTING_NAME:
        apply_django_settings()


class CioCeleryConfig(AppConfig):  # type: ignore[misc]
    name = "cio_celery.contrib.django"
    label = "cio_celery"
    verbose_name = "cio_celery (Customer.io operations as Celery tasks)"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks

        setting_changed.connect(_on_setting_changed, dispatch_uid="cio_celery.contrib.django.setting_changed")
        apply_django_settings()
