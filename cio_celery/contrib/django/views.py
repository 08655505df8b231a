"""The health view: ``health_report(app).as_dict()`` as JSON, 200 when healthy, 503 when not."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from cio_celery.exceptions import ConfigurationError
from cio_celery.health import HealthReport, Problem, health_report, unhealthy
from cio_celery.settings import settings_for_app

from .conf import (
    alias_problem,
    build_django_settings,
    django_key,
    health_thresholds,
    read_config,
    resolve_celery_app,
)

__all__ = ["health"]


def _invalid(setting: str, problem: str) -> Problem:
    return Problem("configuration_invalid", f"{setting} {problem}",
                   f"fix {setting} (`manage.py check` names every problem)", setting=setting)


def _report() -> HealthReport:
    try:
        config = read_config()
        app = resolve_celery_app(config.celery_app)
    except ConfigurationError as exc:
        # The message names the setting, never its value.
        return unhealthy(_invalid(exc.setting, exc.problem))
    config_problems: list[Problem] = []
    if config.redis_alias is not None:
        found = alias_problem(config.redis_alias)
        if found is not None:
            config_problems.append(_invalid(django_key("redis_alias"), found[1]))
    try:
        # CIO_CELERY as it is now: when it does not validate, the app runs on older settings.
        build_django_settings(app, config)
    except ConfigurationError as exc:
        config_problems.append(_invalid(exc.setting, exc.problem))
    try:
        thresholds = health_thresholds(config)
    except ConfigurationError as exc:
        config_problems.append(_invalid(exc.setting, exc.problem))
        thresholds = {}
    try:
        settings = settings_for_app(app)
    except ConfigurationError as exc:
        return unhealthy(_invalid(exc.setting, exc.problem)).with_problems(*config_problems)
    except Exception as exc:  # noqa: BLE001 - answer 503, never 500
        return unhealthy(Problem("health_check_failed", f"the settings could not be read ({type(exc).__name__})",
                                 "run `manage.py check`"))
    return health_report(app, settings, **thresholds).with_problems(*config_problems)


def _health(request: HttpRequest) -> JsonResponse:
    try:
        report = _report()
    except Exception as exc:  # noqa: BLE001 - e.g. redis_alias naming no cache: answer 503, not 500
        report = unhealthy(Problem("health_check_failed", f"health check failed ({type(exc).__name__})",
                                   "run `manage.py check`"))
    return JsonResponse(report.as_dict(), status=report.http_status)


#: GET/HEAD only, never cached (``Cache-Control: max-age=0, no-cache, no-store, must-revalidate, private``).
#: Unauthenticated: it shows counts and the breaker state, no customer data and no credentials.
health: Any = never_cache(require_safe(_health))
