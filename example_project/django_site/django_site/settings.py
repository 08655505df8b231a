"""Settings of the example site: broker, store and Customer.io keys come from the environment."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "cio_celery.contrib.django",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "django_site.urls"
WSGI_APPLICATION = "django_site.wsgi.application"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
    }
}

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # cio_celery's store (breaker, idempotency claims, parked operations, dead letters), reused
    # through CIO_CELERY["redis_alias"]. Give it a Redis that never evicts (maxmemory-policy
    # noeviction) and persists (appendonly yes): not the LRU Redis of your page cache.
    "cio": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("CIO_STORE_URL", f"{REDIS_URL}/1"),
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 5},
    },
}

# Celery (namespace "CELERY" in django_site/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", f"{REDIS_URL}/0")
CELERY_TASK_IGNORE_RESULT = True

# cio_celery. Keys are cio_celery setting names (docs/configuration.md); a key left out, or ""
# or None, falls back to its CIO_* environment variable. CIO_TRACK_URL / CIO_APP_URL point the
# workers at a local fake Customer.io (see README.md).
CIO_CELERY = {
    "celery_app": "django_site.celery.app",
    "site_id": os.environ.get("CIO_SITE_ID"),
    "track_api_key": os.environ.get("CIO_TRACK_API_KEY"),
    "app_api_key": os.environ.get("CIO_APP_API_KEY"),
    "region": os.environ.get("CIO_REGION", "us"),
    "redis_alias": "cio",
    "health_max_dead_letters": 1000,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"cio_celery": {"handlers": ["console"], "level": "INFO"}},
}
