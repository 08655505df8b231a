"""Flask integration: ``CioCelery(app)`` / ``init_app``, ``CIO_CELERY_*`` config keys, a health blueprint.

Works with Flask's "Background Tasks with Celery" pattern: the Celery app is the ``celery``
argument, else ``app.extensions["celery"]`` (where ``celery_init_app`` puts it), else Celery's
current app. One ``CioCelery`` instance serves any number of Flask apps (app factory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

from ..exceptions import ConfigurationError
from ..health import health_report
from ..settings import SETTINGS, Settings, configure

__all__ = ["CioCelery", "CioCeleryState", "health_blueprint"]

PREFIX = "CIO_CELERY_"
# Keys of the extension itself, not cio_celery settings.
_OWN_KEYS = {
    "HEALTH_MAX_DEAD_LETTERS", "HEALTH_MAX_FALLBACK_DEPTH", "HEALTH_BLUEPRINT", "HEALTH_URL_PREFIX",
}


@dataclass
class CioCeleryState:
    """What ``init_app`` leaves in ``app.extensions["cio_celery"]``."""

    celery: Any
    settings: Settings
    max_dead_letters: int | None = None
    max_fallback_depth: int | None = None


def _settings_from_config(config: Any) -> dict[str, Any]:
    names = {s.name.upper(): s.name for s in SETTINGS}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX):]
        if short in _OWN_KEYS:
            continue
        if short not in names:
            raise ConfigurationError(key, "is not a cio_celery setting")
        out[names[short]] = value
    return out


def _celery_of(app: Flask, celery: Any) -> Any:
    if celery is not None:
        return celery
    found = app.extensions.get("celery")
    if found is not None:
        return found
    from celery import current_app as celery_current_app

    return celery_current_app._get_current_object()


def _health() -> Any:
    state: CioCeleryState = current_app.extensions["cio_celery"]
    report = health_report(state.celery, state.settings, max_dead_letters=state.max_dead_letters,
                           max_fallback_depth=state.max_fallback_depth)
    response = jsonify(report.as_dict())
    response.status_code = report.http_status
    response.headers["Cache-Control"] = "no-store"
    return response


def health_blueprint(name: str = "cio_celery") -> Blueprint:
    """A blueprint answering ``GET /health`` with the health report (200 healthy, 503 not)."""
    bp = Blueprint(name, __name__)
    bp.add_url_rule("/health", "health", _health, methods=["GET"])
    return bp


class CioCelery:
    """The Flask extension."""

    def __init__(self, app: Flask | None = None, celery: Any = None) -> None:
        self._celery = celery
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, celery: Any = None) -> CioCeleryState:
        """Configure the Celery app from ``CIO_CELERY_*`` keys; raises ConfigurationError naming the key."""
        celery_app = _celery_of(app, celery if celery is not None else self._celery)
        overrides = _settings_from_config(app.config)
        try:
            settings = configure(celery_app, **overrides)
        except ConfigurationError as exc:
            name = exc.setting.rsplit(".", 1)[-1]
            if name not in {s.name for s in SETTINGS}:
                raise  # an environment variable (CIO_...) or a cross-setting rule: named already
            raise ConfigurationError(f"{PREFIX}{name.upper()}", exc.problem) from None

        def limit(key: str) -> int | None:
            value = app.config.get(PREFIX + key)
            return None if value is None else int(value)

        state = CioCeleryState(celery_app, settings, limit("HEALTH_MAX_DEAD_LETTERS"),
                               limit("HEALTH_MAX_FALLBACK_DEPTH"))
        app.extensions["cio_celery"] = state
        if app.config.get(PREFIX + "HEALTH_BLUEPRINT", True):
            app.register_blueprint(health_blueprint(), url_prefix=app.config.get(PREFIX + "HEALTH_URL_PREFIX", "/cio"))
        return state
