from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("signup/", views.signup, name="signup"),
    path("cio/", include("cio_celery.contrib.django.urls")),
]
