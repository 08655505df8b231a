"""Settings of the test project: the static part here, the per-run part from :func:`build`.

The fixture calls ``django.conf.settings.configure(**build(...))`` rather than setting
``DJANGO_SETTINGS_MODULE``: that variable would be inherited by the ``celery worker``
subprocesses of other test modules, and Celery installs its Django fix-up wherever it is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SECRET_KEY = "cio-celery-test-project-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
INSTALLED_APPS = [
    "cio_celery.contrib.django",
    "django_project",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "django_project.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Leave the process's logging alone: other test modules capture it.
LOGGING_CONFIG = None

STORE_CACHE_ALIAS = "cio"


def build(*, tmp_dir: Path, store_url: str, cio_celery: dict[str, Any]) -> dict[str, Any]:
    """Every setting for ``settings.configure()``: SQLite files in ``tmp_dir``, a django-redis
    cache (alias ``cio``) on the store's Redis, and ``CIO_CELERY``."""
    static = {k: v for k, v in globals().items() if k.isupper() and k != "STORE_CACHE_ALIAS"}
    return {
        **static,
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_dir / "db.sqlite3"),
                "TEST": {"NAME": str(tmp_dir / "test-db.sqlite3")},
            }
        },
        "CACHES": {
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            STORE_CACHE_ALIAS: {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": store_url,
                "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 5},
            },
        },
        "CIO_CELERY": cio_celery,
    }
