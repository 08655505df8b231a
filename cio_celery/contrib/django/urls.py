"""``path("cio/", include("cio_celery.contrib.django.urls"))`` serves ``cio/health/``."""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "cio_celery"

urlpatterns = [
    path("health/", views.health, name="health"),
]
