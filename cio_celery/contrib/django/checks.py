"""Django system checks of ``CIO_CELERY`` (tag ``cio_celery``): ``manage.py check`` runs them.

======================  ==========================================================================
id                      problem
======================  ==========================================================================
``cio_celery.E001``     ``site_id`` or ``track_api_key`` is set nowhere (CIO_CELERY, ``CIO_*`` env)
``cio_celery.W001``     ``app_api_key`` is set nowhere: transactional sends cannot be delivered
``cio_celery.E002``     a key of CIO_CELERY is not a cio_celery setting
``cio_celery.E003``     a value is invalid (the message names where it is set)
``cio_celery.E004``     CIO_CELERY is not a dict (or ``redis_alias`` is not a cache name)
``cio_celery.E005``     ``celery_app`` cannot be imported or is not a Celery app
``cio_celery.E006``     ``redis_alias`` names no cache in CACHES
``cio_celery.E007``     ``redis_alias`` names a cache that is not django-redis
``cio_celery.E008``     both ``redis_alias`` and ``redis_url`` are set
``cio_celery.E009``     a ``health_*`` key is invalid (a count, seconds, or problem names)
``cio_celery.E010``     the Celery configuration breaks a guarantee (``check_configuration`` error)
``cio_celery.W010``     the Celery configuration weakens a guarantee (``check_configuration`` warning)
``cio_celery.W002``     the Celery app in use was not configured from CIO_CELERY
``cio_celery.E099``     the check itself failed (the message names the exception type)
======================  ==========================================================================

Messages name settings and keys, never their values: ``manage.py check`` output ends up in
CI logs.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from django.core import checks

from cio_celery.checks import ERROR, check_configuration
from cio_celery.exceptions import ConfigurationError
from cio_celery.settings import Settings

from .conf import (
    DJANGO_ONLY_KEYS,
    ENV_NAMES,
    FIELD_NAMES,
    SETTING_NAME,
    DjangoConfig,
    alias_problem,
    build_django_settings,
    django_key,
    health_thresholds,
    is_configured,
    read_config,
    resolve_celery_app,
)

__all__ = ["TAG", "check_cio_celery"]

TAG = "cio_celery"

# (setting, check id, hint) of the settings without which operations are dead-lettered.
_REQUIRED = (
    ("site_id", "cio_celery.E001",
     "Track operations (identify, track, ...) are dead-lettered as not_configured without it."),
    ("track_api_key", "cio_celery.E001",
     "Track operations (identify, track, ...) are dead-lettered as not_configured without it."),
    ("app_api_key", "cio_celery.W001",
     "Transactional sends (send_email, send_push, ...) are dead-lettered as not_configured without it; "
     "silence cio_celery.W001 if you use the Track API only."),
)


def _is_set(name: str, config: DjangoConfig, app: Any, settings: Settings | None) -> bool:
    if settings is not None:
        return bool(getattr(settings, name))  # what the app will use, from whichever source
    # The settings could not be built (reported as E003/E005): look at the sources one by one.
    if config.overrides.get(name) or os.environ.get(ENV_NAMES[name]):
        return True
    try:
        return app is not None and bool(app.conf.get(f"cio_{name}"))
    except Exception:  # noqa: BLE001 - an unreadable Celery conf is reported elsewhere
        return False


def _check(config: DjangoConfig) -> list[checks.CheckMessage]:
    out: list[checks.CheckMessage] = []
    for key in sorted(config.unknown):
        close = difflib.get_close_matches(key, sorted(FIELD_NAMES | set(DJANGO_ONLY_KEYS)), n=1)
        out.append(checks.Error(
            f"{django_key(key)} is not a cio_celery setting",
            hint=f"Did you mean {close[0]!r}?" if close else "See docs/configuration.md for the setting names.",
            id="cio_celery.E002",
        ))
    app: Any = None
    try:
        app = resolve_celery_app(config.celery_app)
    except ConfigurationError as exc:
        out.append(checks.Error(f"{exc.setting} {exc.problem}", id="cio_celery.E005"))
    if config.redis_alias is not None:
        problem = alias_problem(config.redis_alias)
        if problem is not None:
            out.append(checks.Error(f"{django_key('redis_alias')} {problem[1]}", id=problem[0]))
        if config.raw.get("redis_url") not in (None, ""):
            out.append(checks.Error(
                f"{django_key('redis_alias')} and {django_key('redis_url')} are both set",
                hint="Keep one: redis_alias reuses a django-redis cache's connection pool, redis_url opens its own.",
                id="cio_celery.E008",
            ))
    try:
        health_thresholds(config)
    except ConfigurationError as exc:
        out.append(checks.Error(f"{exc.setting} {exc.problem}", id="cio_celery.E009"))
    settings: Settings | None = None
    if app is not None:
        try:
            settings = build_django_settings(app, config)
        except ConfigurationError as exc:
            out.append(checks.Error(f"{exc.setting} {exc.problem}", id="cio_celery.E003"))
    for name, check_id, hint in _REQUIRED:
        if not _is_set(name, config, app, settings):
            make = checks.Error if check_id.startswith("cio_celery.E") else checks.Warning
            out.append(make(f"{django_key(name)} is not set (or {ENV_NAMES[name]})", hint=hint, id=check_id))
    if app is None or settings is None:
        return out
    for p in check_configuration(app, settings):
        if p.severity == ERROR:
            out.append(checks.Error(f"{p.setting}: {p.problem}", id="cio_celery.E010"))
        else:
            out.append(checks.Warning(f"{p.setting}: {p.problem}", id="cio_celery.W010"))
    if not is_configured(app):
        where = django_key("celery_app") if config.celery_app is not None else "celery.current_app"
        out.append(checks.Warning(
            f"the Celery app {getattr(app, 'main', None)!r} ({where}) was not configured from {SETTING_NAME} "
            "when Django started",
            hint="Create the Celery app before Django's apps are ready (import it in your project package's "
            "__init__.py, as Celery's 'First steps with Django' shows) or set CIO_CELERY['celery_app'].",
            id="cio_celery.W002",
        ))
    return out


def check_cio_celery(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The ``cio_celery`` system checks; never raises (a failure is reported as E099)."""
    try:
        try:
            config = read_config()
        except ConfigurationError as exc:
            return [checks.Error(f"{exc.setting} {exc.problem}", id="cio_celery.E004")]
        return _check(config)
    except Exception as exc:  # noqa: BLE001 - a check reports, it does not crash manage.py
        return [checks.Error(f"the cio_celery system check failed ({type(exc).__name__})", id="cio_celery.E099")]


checks.register(check_cio_celery, TAG)
