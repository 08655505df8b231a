"""Every operation, enqueued with .delay() and run by a real worker over a real Redis broker."""

from __future__ import annotations

import base64
import re
from typing import Any

import customerio
import pytest

import cio_celery
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def basic(fake: FakeCustomerIO) -> str:
    raw = f"{fake.site_id}:{fake.track_api_key}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def bearer(fake: FakeCustomerIO) -> str:
    return f"Bearer {fake.app_api_key}"


EMAIL_REQUEST = {
    "transactional_message_id": 44,
    "identifiers": {"id": "user-1"},
    "to": "someone@example.com",
    "message_data": {"order": 12},
}

# (task, args, kwargs, method, path, expected body (None: checked by check_body), api)
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], str, str, Any, str]] = [
    ("identify", ("user-1",), {"email": "a@example.com", "plan": "pro"}, "PUT",
     "/api/v1/customers/user-1", {"email": "a@example.com", "plan": "pro"}, "track"),
    ("identify", ("user/1@x",), {"plan": "pro"}, "PUT",
     "/api/v1/customers/user%2F1%40x", {"plan": "pro"}, "track"),
    ("track", ("user-1", "signed_up", {"plan": "pro"}), {}, "POST",
     "/api/v1/customers/user-1/events", {"name": "signed_up", "data": {"plan": "pro"}}, "track"),
    ("track_anonymous", ("anon-1", "visited", {"page": 2}), {}, "POST",
     "/api/v1/events", {"name": "visited", "data": {"page": 2}, "anonymous_id": "anon-1"}, "track"),
    ("pageview", ("user-1", "/pricing"), {"referrer": "ads"}, "POST",
     "/api/v1/customers/user-1/events", {"type": "page", "name": "/pricing", "data": {"referrer": "ads"}},
     "track"),
    ("backfill", ("user-1", "bought", 1_700_000_000), {"sku": "x1"}, "POST",
     "/api/v1/customers/user-1/events", {"name": "bought", "data": {"sku": "x1"}, "timestamp": 1_700_000_000},
     "track"),
    ("delete", ("user-1",), {}, "DELETE", "/api/v1/customers/user-1", {}, "track"),
    ("add_device", ("user-1", "tok-1", "ios"), {"last_used": 1_700_000_000}, "PUT",
     "/api/v1/customers/user-1/devices",
     {"device": {"id": "tok-1", "platform": "ios", "last_used": 1_700_000_000}}, "track"),
    ("delete_device", ("user-1", "tok-1"), {}, "DELETE", "/api/v1/customers/user-1/devices/tok-1", {}, "track"),
    ("suppress", ("user-1",), {}, "POST", "/api/v1/customers/user-1/suppress", {}, "track"),
    ("unsuppress", ("user-1",), {}, "POST", "/api/v1/customers/user-1/unsuppress", {}, "track"),
    ("merge_customers", ("id", "user-1", "email", "old@example.com"), {}, "POST", "/api/v1/merge_customers",
     {"primary": {"id": "user-1"}, "secondary": {"email": "old@example.com"}}, "track"),
    ("batch", ([{"type": "person", "identifiers": {"id": "user-1"}, "action": "identify",
                 "attributes": {"plan": "pro"}}],), {}, "POST", "/api/v2/batch",
     {"batch": [{"type": "person", "identifiers": {"id": "user-1"}, "action": "identify",
                 "attributes": {"plan": "pro"}}]}, "track"),
    ("send_email", (EMAIL_REQUEST,), {}, "POST", "/v1/send/email", EMAIL_REQUEST, "app"),
    ("send_push", ({"transactional_message_id": 5, "identifiers": {"id": "user-1"}, "title": "Hi"},), {},
     "POST", "/v1/send/push", {"transactional_message_id": 5, "identifiers": {"id": "user-1"}, "title": "Hi"},
     "app"),
    ("send_sms", ({"transactional_message_id": 6, "identifiers": {"email": "a@example.com"}},), {}, "POST",
     "/v1/send/sms", {"transactional_message_id": 6, "identifiers": {"email": "a@example.com"}}, "app"),
    ("send_whatsapp", ({"transactional_message_id": 7, "identifiers": {"id": "user-1"}},), {}, "POST",
     "/v1/send/whatsapp", {"transactional_message_id": 7, "identifiers": {"id": "user-1"}}, "app"),
    ("send_inbox_message", ({"transactional_message_id": 8, "identifiers": {"id": "user-1"}},), {}, "POST",
     "/v1/send/inbox_message", {"transactional_message_id": 8, "identifiers": {"id": "user-1"}}, "app"),
    ("send_in_app", ({"transactional_message_id": 9, "identifiers": {"cio_id": "c1"}},), {}, "POST",
     "/v1/send/in_app", {"transactional_message_id": 9, "identifiers": {"cio_id": "c1"}}, "app"),
]

EVENT_OPS = {"track", "track_anonymous", "pageview", "backfill"}


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "method", "path", "body", "api"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_operation_is_delivered_by_a_real_worker(
    worker_app: Any, fake: FakeCustomerIO, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
    method: str, path: str, body: Any, api: str,
) -> None:
    getattr(cio_celery, name).delay(*args, **kwargs)
    [req] = fake.wait_for_requests(1, timeout=15)
    assert req.method == method
    assert req.path == path
    # A backfill is a track request with a timestamp: the wire cannot tell them apart.
    assert req.operation == {"backfill": "track"}.get(name, name)
    assert req.authorized
    assert req.status == 200
    expected_auth = basic(fake) if api == "track" else bearer(fake)
    assert req.headers.get("Authorization") == expected_auth
    got = dict(req.json or {})
    if name in EVENT_OPS:
        # A ULID minted at enqueue, so Customer.io itself drops a duplicate delivery.
        assert ULID.match(got.pop("id")), "event id must be a ULID"
    assert got == body
    assert len(fake.applied) == 1 or name == "batch"


def test_transactional_send_accepts_the_sdk_request_object(worker_app: Any, fake: FakeCustomerIO) -> None:
    request = customerio.SendEmailRequest(
        transactional_message_id=3, identifiers={"id": "user-9"}, to="x@example.com", subject="Hello"
    )
    cio_celery.send_email.delay(request)
    [req] = fake.wait_for_requests(1, timeout=15)
    assert req.path == "/v1/send/email"
    assert req.json == {
        "transactional_message_id": 3, "identifiers": {"id": "user-9"}, "to": "x@example.com", "subject": "Hello",
    }


def test_a_caller_event_id_is_sent_unchanged(worker_app: Any, fake: FakeCustomerIO) -> None:
    cio_celery.track.delay("user-1", "paid", {"n": 1}, id="01ARZ3NDEKTSV4RRFFQ69G5FAV")
    [req] = fake.wait_for_requests(1, timeout=15)
    assert req.json["id"] == "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def test_apply_async_and_signatures_go_through_the_same_path(worker_app: Any, fake: FakeCustomerIO) -> None:
    cio_celery.identify.apply_async(("user-2",), {"plan": "a"})
    cio_celery.identify.s("user-3", plan="b").apply_async()
    reqs = fake.wait_for_requests(2, timeout=15)
    assert sorted(r.path for r in reqs) == ["/api/v1/customers/user-2", "/api/v1/customers/user-3"]


def test_each_message_carries_the_hard_time_limit_setting(celery_session_app: Any) -> None:
    from celery import signals

    seen: list[Any] = []

    def on_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append(headers.get("timelimit"))

    signals.before_task_publish.connect(on_publish, weak=False)
    try:
        cio_celery.delete.delay("user-1")
    finally:
        signals.before_task_publish.disconnect(on_publish)
    limit = settings_for_app(celery_session_app).task_time_limit
    assert [list(t) for t in seen] == [[limit, None]]
