from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("identify/", views.identify_customer, name="identify"),
    path("signup/", views.signup, name="signup"),
    # GET /cio/health/: the health report as JSON, 200 when healthy, 503 when not.
    path("cio/", include("cio_celery.contrib.django.urls")),
]
