"""The health view: ``health_report(app).as_dict()`` as JSON, 200 when healthy, 503 when not."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from cio_celery.exceptions import ConfigurationError
from cio_celery.health import HealthReport, health_report
from cio_celery.settings import settings_for_app

from .conf import health_thresholds, read_config, resolve_celery_app

__all__ = ["health"]


def _health(request: HttpRequest) -> JsonResponse:
    try:
        config = read_config()
        thresholds = health_thresholds(config)
        app = resolve_celery_app(config.celery_app)
        settings = settings_for_app(app)
    except ConfigurationError as exc:
        # The message names the setting, never its value.
        report = _unhealthy(f"configuration: {exc.setting} {exc.problem}")
    else:
        try:
            report = health_report(app, settings, **thresholds)
        except Exception as exc:  # noqa: BLE001 - e.g. redis_alias naming no cache: answer 503, not 500
            report = _unhealthy(f"health check failed ({type(exc).__name__})")
    return JsonResponse(report.as_dict(), status=report.http_status)


def _unhealthy(problem: str) -> HealthReport:
    return HealthReport(
        healthy=False, problems=[problem], breaker=None, fallback_depth=None, dead_letters=None, spool_depth=None
    )


#: GET/HEAD only, never cached (``Cache-Control: max-age=0, no-cache, no-store, must-revalidate, private``).
#: Unauthenticated: it shows counts and the breaker state, no customer data and no credentials.
health: Any = never_cache(require_safe(_health))
