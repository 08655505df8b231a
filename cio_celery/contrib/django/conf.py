"""Django's ``CIO_CELERY`` dict mapped onto cio_celery's settings of a Celery app.

``CIO_CELERY`` keys are cio_celery setting names (``site_id``, ``track_api_key``,
``redis_url`` ...; see :data:`cio_celery.settings.SETTINGS`), plus the Django-only keys
of :data:`DJANGO_ONLY_KEYS`. Environment variables (``CIO_*``) and the Celery app's
``cio_*`` configuration still apply underneath: ``CIO_CELERY`` overrides them.

Nothing in this module puts a setting's value in a message: only setting names.
"""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from cio_celery.exceptions import ConfigurationError
from cio_celery.settings import SETTINGS, Settings, _build_for_app, configure, settings_for_app
from cio_celery.store import DJANGO_REDIS_SCHEME

__all__ = [
    "DJANGO_ONLY_KEYS",
    "DJANGO_REDIS_BACKEND",
    "SETTING_NAME",
    "DjangoConfig",
    "alias_problem",
    "build_django_settings",
    "celery_app",
    "cio_settings",
    "configure_from_django",
    "describe_setting",
    "django_key",
    "health_thresholds",
    "is_configured",
    "read_config",
    "resolve_celery_app",
]

SETTING_NAME = "CIO_CELERY"

#: Keys of ``CIO_CELERY`` that are not cio_celery settings but belong to the integration.
DJANGO_ONLY_KEYS = (
    "celery_app", "redis_alias", "health_max_dead_letters", "health_max_fallback_depth", "health_max_spool_age",
    "health_ignore",
)

DJANGO_REDIS_BACKEND = "django_redis.cache.RedisCache"

FIELD_NAMES = frozenset(s.name for s in SETTINGS)
ENV_NAMES = {s.name: s.env for s in SETTINGS}

# Celery apps configured from CIO_CELERY in this process (weakly: apps may come and go in tests).
_configured: weakref.WeakSet[Any] = weakref.WeakSet()


def django_key(name: str) -> str:
    """How a key is named in messages: ``CIO_CELERY['track_api_key']``."""
    return f"{SETTING_NAME}[{name!r}]"


@dataclass(frozen=True)
class DjangoConfig:
    """``CIO_CELERY`` split into cio_celery settings and the integration's own keys."""

    raw: Mapping[str, Any] = field(default_factory=dict)
    #: cio_celery settings to apply (``redis_alias`` already mapped onto ``redis_url``).
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: Keys that are neither cio_celery settings nor Django-only keys (reported by the checks).
    unknown: tuple[str, ...] = ()
    celery_app: Any = None
    redis_alias: str | None = None


def read_config(raw: Any = None) -> DjangoConfig:
    """Read ``settings.CIO_CELERY`` (or ``raw``); raises ConfigurationError if it is not a dict."""
    if raw is None:
        from django.conf import settings

        raw = getattr(settings, SETTING_NAME, None)
        if raw is None:
            return DjangoConfig()
    if not isinstance(raw, Mapping):
        raise ConfigurationError(SETTING_NAME, "must be a dict of cio_celery settings")
    unknown = tuple(str(k) for k in raw if k not in FIELD_NAMES and k not in DJANGO_ONLY_KEYS)
    # None or "" leaves a setting to the environment, as an empty CIO_* variable does
    # (so ``os.environ.get("CIO_SITE_ID", "")`` means "unset", not "empty").
    overrides = {k: v for k, v in raw.items() if k in FIELD_NAMES and v is not None and v != ""}
    alias = raw.get("redis_alias")
    if alias is not None:
        if not isinstance(alias, str) or not alias.strip() or "/" in alias:
            raise ConfigurationError(django_key("redis_alias"), "must be the name of a cache in CACHES")
        overrides["redis_url"] = DJANGO_REDIS_SCHEME + alias
    return DjangoConfig(
        raw=dict(raw), overrides=overrides, unknown=unknown, celery_app=raw.get("celery_app"), redis_alias=alias
    )


def _is_celery_app(obj: Any) -> bool:
    from celery import Celery

    return isinstance(obj, Celery)


def resolve_celery_app(spec: Any = None) -> Any:
    """The Celery app: ``spec`` a dotted path (``proj.celery.app`` or ``proj.celery:app``) or an
    app; ``None`` is ``celery.current_app``. Raises ConfigurationError naming ``celery_app``."""
    if spec is None:
        from celery import current_app

        return current_app._get_current_object()
    if _is_celery_app(spec):
        return spec
    key = django_key("celery_app")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigurationError(key, "must be the dotted path of a Celery app, such as 'proj.celery.app'")
    module_name, sep, attr = spec.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name or attr)
        if module_name and attr:
            obj = getattr(obj, attr)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(key, f"cannot be imported: no module named {exc.name!r}") from None
    except AttributeError:
        raise ConfigurationError(key, f"cannot be imported: {module_name!r} has no attribute {attr!r}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: name the error only
        raise ConfigurationError(key, f"cannot be imported ({type(exc).__name__})") from None
    if isinstance(obj, ModuleType):  # "proj.celery": its app, as ``celery -A`` finds it
        obj = getattr(obj, "app", None) or getattr(obj, "celery", None)
    if not _is_celery_app(obj):
        raise ConfigurationError(key, "does not name a Celery app (celery.Celery instance)")
    return obj


def describe_setting(name: str, config: DjangoConfig, app: Any = None) -> str:
    """Where the user sets what a ConfigurationError names: CIO_CELERY key, env var or Celery conf."""
    prefix = f"{SETTING_NAME}."
    if name.startswith(prefix):
        return django_key(name[len(prefix):])
    if name not in FIELD_NAMES:
        return name  # an environment variable (CIO_TIMEOUT cannot be parsed) or a Celery setting
    if name == "redis_url" and config.redis_alias is not None:
        return django_key("redis_alias")
    if name in config.raw:
        return django_key(name)
    if os.environ.get(ENV_NAMES[name]):
        return ENV_NAMES[name]
    if app is not None and app.conf.get(f"cio_{name}") is not None:
        return f"cio_{name} (Celery configuration)"
    return django_key(name)


def build_django_settings(app: Any = None, config: DjangoConfig | None = None) -> Settings:
    """The settings ``CIO_CELERY`` gives ``app`` (env and Celery conf underneath), not installed.

    Raises ConfigurationError whose ``setting`` is where to fix it (``CIO_CELERY['region']``,
    ``CIO_TIMEOUT`` ...). Unknown keys are ignored here; the system checks report them.
    """
    config = read_config() if config is None else config
    target = resolve_celery_app(config.celery_app) if app is None else app
    try:
        # As configure() builds them (Celery conf ``cio_*`` keys and the broker URL under the
        # overrides), without installing them.
        return _build_for_app(target, config.overrides, source=SETTING_NAME)
    except ConfigurationError as exc:
        raise ConfigurationError(describe_setting(exc.setting, config, target), exc.problem) from None


def configure_from_django(app: Any = None) -> Settings:
    """Build the settings from ``CIO_CELERY`` and install them on the Celery app.

    The app config calls this when Django starts and when ``CIO_CELERY`` changes
    (``override_settings``); call it yourself after replacing the app's settings by hand.
    Raises ConfigurationError (naming the setting) and leaves the app as it was.
    """
    config = read_config()
    target = resolve_celery_app(config.celery_app) if app is None else app
    settings = build_django_settings(target, config)
    configure(target, settings)
    _configured.add(target)
    return settings


def is_configured(app: Any) -> bool:
    """Whether ``app`` was configured from ``CIO_CELERY`` in this process."""
    try:
        return app in _configured
    except TypeError:
        return False


def celery_app() -> Any:
    """The Celery app ``CIO_CELERY`` configures (``celery_app``, else ``celery.current_app``)."""
    return resolve_celery_app(read_config().celery_app)


def cio_settings() -> Settings:
    """The cio_celery settings in use by :func:`celery_app`."""
    return settings_for_app(celery_app())


_THRESHOLDS = (("health_max_dead_letters", "max_dead_letters"), ("health_max_fallback_depth", "max_fallback_depth"))


def health_thresholds(config: DjangoConfig | None = None) -> dict[str, Any]:
    """``max_dead_letters``, ``max_fallback_depth``, ``max_spool_age`` and ``ignore`` for
    :func:`cio_celery.health.health_report`, from ``CIO_CELERY['health_*']``."""
    from cio_celery.health import DEFAULT_MAX_SPOOL_AGE, PROBLEM_NAMES

    config = read_config() if config is None else config
    out: dict[str, Any] = {}
    for key, arg in _THRESHOLDS:
        value = config.raw.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigurationError(django_key(key), "must be a whole number, 0 or more")
        out[arg] = value
    age = config.raw.get("health_max_spool_age", DEFAULT_MAX_SPOOL_AGE)
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not age > 0:
        raise ConfigurationError(django_key("health_max_spool_age"), "must be a number of seconds, more than 0")
    out["max_spool_age"] = float(age)
    ignore = config.raw.get("health_ignore") or ()
    if isinstance(ignore, str) or not all(isinstance(n, str) and n in PROBLEM_NAMES for n in ignore):
        raise ConfigurationError(django_key("health_ignore"),
                                 "must be a list of problem names such as ['app_credentials_missing']")
    out["ignore"] = tuple(ignore)
    return out


def alias_problem(alias: str) -> tuple[str, str] | None:
    """``(check id, problem)`` when ``alias`` is not a django-redis cache of ``CACHES``."""
    from django.conf import settings

    caches = getattr(settings, "CACHES", None) or {}
    if alias not in caches:
        known = ", ".join(repr(a) for a in sorted(caches)) or "none"
        return "cio_celery.E006", f"names no cache in CACHES (defined: {known})"
    backend = (caches[alias] or {}).get("BACKEND", "")
    try:
        from django.utils.module_loading import import_string
        from django_redis.cache import RedisCache
    except ImportError:
        return "cio_celery.E007", "needs django-redis, which is not installed (pip install 'cio-celery[django]')"
    try:
        cls = import_string(backend)
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, RedisCache)):
        return "cio_celery.E007", (
            f"names cache {alias!r} whose BACKEND {backend!r} is not django-redis ({DJANGO_REDIS_BACKEND}); "
            "Django's own django.core.cache.backends.redis.RedisCache has no connection pool to reuse"
        )
    return None
