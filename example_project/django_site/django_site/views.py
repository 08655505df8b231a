"""Two endpoints: identify a person now, and sign one up with an event sent on commit.

They are called with curl in README.md, hence ``csrf_exempt``: put your own authentication
in front of anything like them.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from cio_celery import ValidationError, identify, track


@csrf_exempt
@require_POST
def identify_customer(request: HttpRequest) -> JsonResponse:
    """``POST id=42&email=...&plan=...``: create or update the person in Customer.io."""
    attrs = {k: v for k, v in request.POST.items() if k != "id"}
    try:
        # Validated here (a bad call raises, nothing is published); never blocks longer than
        # CIO_ENQUEUE_TIMEOUT, even with the broker down (the operation waits in the local spool).
        result = identify.delay(request.POST.get("id", ""), **attrs)
    except ValidationError as exc:
        return JsonResponse({"error": str(exc), "field": exc.field}, status=400)
    return JsonResponse({"queued": result.id}, status=202)


@csrf_exempt
@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    """``POST email=...&plan=...``: create a user and track ``signed_up`` once it is committed."""
    email = request.POST.get("email", "")
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=email, email=email)
            # Validated now; published only if the transaction commits (never for a rolled-back user).
            track.delay_on_commit(str(user.pk), "signed_up", {"plan": request.POST.get("plan", "free")})
    except IntegrityError:
        return JsonResponse({"error": "already signed up"}, status=409)
    except ValidationError as exc:
        return JsonResponse({"error": str(exc), "field": exc.field}, status=400)
    return JsonResponse({"user": user.pk}, status=201)
