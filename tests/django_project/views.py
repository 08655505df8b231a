"""A view that writes a row and tracks an event in one transaction, committed or rolled back."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from cio_celery import ValidationError, track

from .models import Signup


class Rollback(Exception):
    """Raised inside the transaction to roll it back."""


@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    email = request.POST.get("email", "")
    try:
        with transaction.atomic():
            Signup.objects.create(email=email)
            # Validated now; published only if the transaction commits.
            track.delay_on_commit(request.POST.get("customer_id", ""), request.POST.get("event", "signed_up"),
                                  {"plan": request.POST.get("plan", "free")})
            if request.POST.get("fail"):
                raise Rollback
    except Rollback:
        return JsonResponse({"committed": False}, status=409)
    except ValidationError as exc:
        return JsonResponse({"error": "invalid", "field": exc.field}, status=400)
    return JsonResponse({"committed": True}, status=201)
