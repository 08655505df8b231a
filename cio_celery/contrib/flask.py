"""Flask integration: ``CioCelery(app)`` / ``init_app``, ``CIO_CELERY_*`` config keys, a health blueprint.

Works with Flask's "Background Tasks with Celery" pattern: the Celery app is the ``celery``
argument, else ``app.extensions["celery"]`` (where ``celery_init_app`` puts it), else Celery's
current app. One ``CioCelery`` instance serves any number of Flask apps (app factory); each
app's state is in ``app.extensions["cio_celery"]``.

Config keys are ``CIO_CELERY_`` + a setting name in upper case (``CIO_CELERY_SITE_ID``,
``CIO_CELERY_REDIS_URL`` ...), plus the extension's own keys (:data:`OWN_KEYS`). The
environment (``CIO_*``) and the Celery app's ``cio_*`` conf still apply underneath; a key
set to ``None`` or ``""`` leaves the setting to them. Every error names a key, never a value.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from ..checks import check_configuration, credential_gaps, log_configuration_problems
from ..exceptions import ConfigurationError
from ..health import DEFAULT_MAX_SPOOL_AGE, PROBLEM_NAMES, HealthReport, Problem, health_report, unhealthy
from ..settings import SETTINGS, Settings, configure

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "OWN_KEYS", "PREFIX", "CioCelery", "CioCeleryState", "config_key", "health_blueprint", "settings_from_config",
]

logger = logging.getLogger("cio_celery.contrib.flask")

PREFIX = "CIO_CELERY_"
EXTENSION = "cio_celery"

#: Keys of the extension itself (after :data:`PREFIX`), not cio_celery settings.
OWN_KEYS = (
    "HEALTH_BLUEPRINT", "HEALTH_URL_PREFIX", "HEALTH_MAX_DEAD_LETTERS", "HEALTH_MAX_FALLBACK_DEPTH",
    "HEALTH_MAX_SPOOL_AGE", "HEALTH_IGNORE",
)

_SPECS = {s.name: s for s in SETTINGS}
_BY_KEY = {s.name.upper(): s.name for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def config_key(name: str) -> str:
    """The Flask config key of a setting: ``track_api_key`` -> ``CIO_CELERY_TRACK_API_KEY``."""
    return PREFIX + name.upper()


@dataclass(frozen=True)
class CioCeleryState:
    """What ``init_app`` leaves in ``app.extensions["cio_celery"]``."""

    #: The Celery app the settings were installed on.
    celery: Any
    settings: Settings
    max_dead_letters: int | None = None
    max_fallback_depth: int | None = None
    max_spool_age: float = DEFAULT_MAX_SPOOL_AGE
    #: Problem names reported but not judged (``CIO_CELERY_HEALTH_IGNORE``).
    ignore: tuple[str, ...] = ()

    def health(self) -> HealthReport:
        """The health report the blueprint serves (Redis, broker and worker reads; never raises)."""
        return health_report(
            self.celery, self.settings,
            max_dead_letters=self.max_dead_letters, max_fallback_depth=self.max_fallback_depth,
            max_spool_age=self.max_spool_age, ignore=self.ignore,
        )


# -- reading the Flask config ------------------------------------------------------------

def _kind(name: str) -> str:
    """``str``, ``int``, ``float`` or ``bool``: the type of a ``Settings`` field."""
    annotation = str(Settings.__dataclass_fields__[name].type)
    return annotation.split("|")[0].strip()


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(key, "must be True or False")


def _coerce(key: str, name: str, value: Any) -> Any:
    """A Flask config value as the setting's type; strings are parsed as the ``CIO_*`` variables are.

    ``app.config.from_prefixed_env()`` gives JSON-decoded values (``5``, ``true``), ``from_pyfile``
    Python values, environment lookups strings: all are accepted when they mean the same thing.
    """
    kind = _kind(name)
    if kind == "bool":
        return _parse_bool(key, value)
    if isinstance(value, bool):
        raise ConfigurationError(key, f"must be a {'number' if kind in ('int', 'float') else 'string'}, not a bool")
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int):  # from_prefixed_env decodes a numeric site id as JSON
            return str(value)
        raise ConfigurationError(key, "must be a string")
    if isinstance(value, str):
        try:
            return _SPECS[name].parse(value)
        except ValueError:
            raise ConfigurationError(key, f"cannot be parsed as {'a whole number' if kind == 'int' else 'a number'}") \
                from None
    if kind == "float" and isinstance(value, (int, float)):
        return float(value)
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigurationError(key, "must be a whole number" if kind == "int" else "must be a number")


def settings_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``CIO_CELERY_*`` settings of a Flask config as ``configure()`` keyword arguments.

    Unknown ``CIO_CELERY_*`` keys (a typo) raise ConfigurationError naming the key; ``None`` and
    ``""`` are left out (the environment and the Celery conf decide).
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX):]
        if short in OWN_KEYS:
            continue
        if short not in _BY_KEY:
            raise ConfigurationError(key, "is not a cio_celery setting (see docs/configuration.md)")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        name = _BY_KEY[short]
        out[name] = _coerce(key, name, value)
    return out


def _threshold(config: Mapping[str, Any], short: str) -> int | None:
    key = PREFIX + short
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(key, "must be a whole number, 0 or more")
    return value


def _spool_age(config: Mapping[str, Any]) -> float:
    key = PREFIX + "HEALTH_MAX_SPOOL_AGE"
    value = config.get(key, DEFAULT_MAX_SPOOL_AGE)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigurationError(key, "must be a number of seconds, more than 0") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(key, "must be a number of seconds, more than 0")
    return float(value)


def _ignore(config: Mapping[str, Any]) -> tuple[str, ...]:
    key = PREFIX + "HEALTH_IGNORE"
    value = config.get(key) or ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not all(isinstance(v, str) and v in PROBLEM_NAMES for v in value):
        raise ConfigurationError(key, "must be problem names such as ['app_credentials_missing'] (docs/monitoring.md)")
    return tuple(value)


def _where(name: str, mapped: Mapping[str, Any], celery_app: Any) -> str:
    """Where the user sets what a ConfigurationError names: a Flask key, a ``CIO_*`` variable or Celery conf."""
    if name not in _SPECS:
        return name  # an environment variable that cannot be parsed (CIO_TIMEOUT), already named
    if name in mapped:
        return config_key(name)
    if os.environ.get(_SPECS[name].env):
        return _SPECS[name].env
    if celery_app.conf.get(f"cio_{name}") is not None:
        return f"cio_{name} (Celery configuration)"
    return config_key(name)


def _resolve_celery(app: Flask, celery: Any) -> Any:
    if celery is not None:
        return celery
    found = app.extensions.get("celery")
    if found is not None:
        return found
    from celery import current_app as celery_current_app

    return celery_current_app._get_current_object()


# -- the health blueprint ----------------------------------------------------------------

def _health() -> Response:
    state = current_app.extensions.get(EXTENSION)
    if not isinstance(state, CioCeleryState):
        report = unhealthy(Problem("configuration_invalid", "cio_celery is not initialised for this Flask app",
                                   "call CioCelery().init_app(app) in the app factory"))
    else:
        try:
            report = state.health()
        except Exception as exc:  # noqa: BLE001 - a health check answers 503, never 500
            report = unhealthy(Problem("health_check_failed", f"health check failed ({type(exc).__name__})",
                                       "report it; the app's log may say more"))
    response = jsonify(report.as_dict())
    response.status_code = report.http_status
    response.headers["Cache-Control"] = "no-store"
    return response


def health_blueprint(name: str = EXTENSION) -> Blueprint:
    """A new blueprint answering ``GET /health`` with the health report (200 healthy, 503 not).

    For ``CIO_CELERY_HEALTH_BLUEPRINT = False`` and registering it yourself, e.g. behind your own
    URL or decorators: ``app.register_blueprint(health_blueprint(), url_prefix="/internal")``.
    The app still needs ``init_app``: the view reads ``app.extensions["cio_celery"]``.
    The answer holds counts and the breaker state only: no customer data, no credentials.
    """
    bp = Blueprint(name, __name__)
    bp.add_url_rule("/health", "health", _health, methods=["GET"])
    return bp


# -- the extension -----------------------------------------------------------------------

class CioCelery:
    """The Flask extension: ``CioCelery(app)``, or ``cio = CioCelery()`` then ``cio.init_app(app)``."""

    def __init__(self, app: Flask | None = None, celery: Celery | None = None) -> None:
        self.celery = celery
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, celery: Celery | None = None) -> CioCeleryState:
        """Install the ``CIO_CELERY_*`` settings on the Celery app and register the health blueprint.

        The Celery app is ``celery``, else the one given to the constructor, else
        ``app.extensions["celery"]``, else Celery's current app. Raises ConfigurationError naming
        the key to fix (``CIO_CELERY_TIMEOUT``, or ``CIO_TIMEOUT`` when the environment's value is
        bad); the Celery app then keeps its settings.
        """
        celery_app = _resolve_celery(app, celery if celery is not None else self.celery)
        mapped = settings_from_config(app.config)
        thresholds = (_threshold(app.config, "HEALTH_MAX_DEAD_LETTERS"),
                      _threshold(app.config, "HEALTH_MAX_FALLBACK_DEPTH"), _spool_age(app.config), _ignore(app.config))
        register = _parse_bool(PREFIX + "HEALTH_BLUEPRINT", app.config.get(PREFIX + "HEALTH_BLUEPRINT", True))
        url_prefix = app.config.get(PREFIX + "HEALTH_URL_PREFIX", "/cio")
        if not isinstance(url_prefix, str):
            raise ConfigurationError(PREFIX + "HEALTH_URL_PREFIX", "must be a URL path such as /cio")
        try:
            settings = configure(celery_app, **mapped)
        except ConfigurationError as exc:
            name = exc.setting.rsplit(".", 1)[-1]  # "settings.timeout" -> "timeout"
            raise ConfigurationError(_where(name, mapped, celery_app), exc.problem) from None

        state = CioCeleryState(celery_app, settings, *thresholds)
        app.extensions[EXTENSION] = state
        if register and EXTENSION not in app.blueprints:  # init_app twice re-reads the config only
            app.register_blueprint(health_blueprint(), url_prefix=url_prefix)
        self._warn_if_not_current(celery_app)
        self._warn_about(celery_app, settings, state.ignore)
        return state

    @staticmethod
    def _warn_about(celery_app: Any, settings: Settings, ignore: tuple[str, ...]) -> None:
        """What would stop or weaken delivery, said now rather than in dead letters: missing credentials
        and the Celery settings the guarantees rest on (no network: the broker and workers are not asked)."""
        try:
            missing = credential_gaps(settings)
            track = [v for v in missing if v != "CIO_APP_API_KEY"]
            if track and "track_credentials_missing" not in ignore:
                logger.warning(
                    "cio_celery: %s not set: Track operations (identify, track ...) will be dead-lettered as "
                    "not_configured; set %s (or %s) where the workers run", " and ".join(track),
                    " and ".join(track), " and ".join(config_key(v[4:].lower()) for v in track),
                )
            if "CIO_APP_API_KEY" in missing and "app_credentials_missing" not in ignore:
                logger.warning(
                    "cio_celery: CIO_APP_API_KEY not set: transactional sends (send_email ...) will be "
                    "dead-lettered as not_configured; set CIO_APP_API_KEY (or CIO_CELERY_APP_API_KEY), or "
                    "CIO_CELERY_HEALTH_IGNORE = ['app_credentials_missing'] if you use the Track API only",
                )
            log_configuration_problems(check_configuration(celery_app, settings), logger)
        except Exception as exc:  # noqa: BLE001 - a warning must never stop the app factory
            logger.warning("cio_celery: the start-up checks failed (%s)", type(exc).__name__)

    @staticmethod
    def _warn_if_not_current(celery_app: Any) -> None:
        """``identify.delay()`` publishes through Celery's current app: say so when it is another one."""
        from celery import current_app as celery_current_app

        if celery_current_app._get_current_object() is not celery_app:
            logger.warning(
                "cio_celery: the Celery app %r configured for Flask is not Celery's current app, which "
                "identify.delay() and the other operations publish through; call set_default() on it "
                "(Flask's celery_init_app does)", getattr(celery_app, "main", None),
            )

    @staticmethod
    def state(app: Flask | None = None) -> CioCeleryState:
        """The state ``init_app`` left in ``app`` (default: Flask's current app)."""
        target = current_app if app is None else app
        found = target.extensions.get(EXTENSION)
        if not isinstance(found, CioCeleryState):
            raise RuntimeError("cio_celery is not initialised for this Flask app: call CioCelery().init_app(app)")
        return found
