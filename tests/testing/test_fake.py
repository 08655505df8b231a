"""FakeCustomerIO over real HTTP: routes, auth, recording, faults, dedup, control API, lifecycle."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import customerio
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cio_celery.testing import AppliedOperation, FakeCustomerIO, RecordedRequest

ODD_ID = "team/a@example.com"
ODD_ID_PATH = quote(ODD_ID, safe="")  # what the SDK sends: team%2Fa%40example.com
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake(fake_customerio: FakeCustomerIO) -> FakeCustomerIO:
    return fake_customerio


@pytest.fixture
def track(fake: FakeCustomerIO) -> Iterator[requests.Session]:
    """A pooled session with the Track API's Basic auth, like the SDK's."""
    with requests.Session() as session:
        session.auth = (fake.site_id, fake.track_api_key)
        yield session


@pytest.fixture
def app(fake: FakeCustomerIO) -> Iterator[requests.Session]:
    """A pooled session with the App API's Bearer auth."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {fake.app_api_key}"
        yield session


@pytest.fixture
def sdk(fake: FakeCustomerIO) -> customerio.APIClient:
    return customerio.APIClient(fake.app_api_key, url=fake.url, retries=0)


def identify(
    fake: FakeCustomerIO, session: requests.Session, cid: str = "u1", **kw: Any
) -> requests.Response:
    return session.put(f"{fake.url}/api/v1/customers/{quote(cid, safe='')}", json={"plan": "pro"}, **kw)


# ---------------------------------------------------------------- auth


def test_track_basic_auth_is_accepted(fake: FakeCustomerIO, track: requests.Session) -> None:
    response = identify(fake, track)
    assert response.status_code == 200
    assert response.json() == {}
    [req] = fake.requests
    assert req.authorized and req.api == "track" and req.status == 200
    assert len(fake.applied) == 1


@pytest.mark.parametrize(
    "auth",
    [None, ("test-site", "wrong-key"), ("other-site", "test-track-key")],
    ids=["missing", "wrong-key", "wrong-site"],
)
def test_track_basic_auth_is_refused(fake: FakeCustomerIO, auth: tuple[str, str] | None) -> None:
    response = requests.put(f"{fake.url}/api/v1/customers/u1", json={}, auth=auth)
    assert response.status_code == 401
    assert response.json() == {"meta": {"error": "unauthorized"}}
    [req] = fake.requests
    assert not req.authorized and req.status == 401
    assert fake.applied == []


def test_track_refuses_the_app_key_as_bearer(fake: FakeCustomerIO, app: requests.Session) -> None:
    assert app.put(f"{fake.url}/api/v1/customers/u1", json={}).status_code == 401


def test_app_bearer_auth_is_accepted_and_refused(fake: FakeCustomerIO) -> None:
    url = f"{fake.url}/v1/send/email"
    body = {"transactional_message_id": 1, "identifiers": {"id": "u1"}}
    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {fake.app_api_key}"})
    wrong = requests.post(url, json=body, headers={"Authorization": "Bearer nope"})
    basic = requests.post(url, json=body, auth=(fake.site_id, fake.track_api_key))
    assert (ok.status_code, wrong.status_code, basic.status_code) == (200, 401, 401)
    assert [r.authorized for r in fake.requests] == [True, False, False]
    assert [r.api for r in fake.requests] == ["app", "app", "app"]
    assert len(fake.applied) == 1


def test_unauthorized_requests_do_not_consume_scripted_faults(fake: FakeCustomerIO) -> None:
    fake.fail_next(status=500)
    assert requests.put(f"{fake.url}/api/v1/customers/u1", json={}).status_code == 401
    assert (
        requests.put(f"{fake.url}/api/v1/customers/u1", json={}, auth=(fake.site_id, "x")).status_code == 401
    )
    with requests.Session() as session:
        session.auth = (fake.site_id, fake.track_api_key)
        assert identify(fake, session).status_code == 500


# ---------------------------------------------------------------- routes

TRACK_ROUTES: list[tuple[str, str, Any, str, str | None]] = [
    ("PUT", f"/api/v1/customers/{ODD_ID_PATH}", {"email": "a@example.com"}, "identify", ODD_ID),
    ("DELETE", f"/api/v1/customers/{ODD_ID_PATH}", {}, "delete", ODD_ID),
    ("POST", f"/api/v1/customers/{ODD_ID_PATH}/events", {"name": "signed_up", "data": {}}, "track", ODD_ID),
    (
        "POST",
        f"/api/v1/customers/{ODD_ID_PATH}/events",
        {"type": "page", "name": "/p", "data": {}},
        "pageview",
        ODD_ID,
    ),
    (
        "POST",
        "/api/v1/events",
        {"name": "visit", "data": {}, "anonymous_id": "anon-1"},
        "track_anonymous",
        None,
    ),
    (
        "PUT",
        f"/api/v1/customers/{ODD_ID_PATH}/devices",
        {"device": {"id": "tok-1", "platform": "ios"}},
        "add_device",
        ODD_ID,
    ),
    ("DELETE", f"/api/v1/customers/{ODD_ID_PATH}/devices/tok%2F1", {}, "delete_device", ODD_ID),
    ("POST", f"/api/v1/customers/{ODD_ID_PATH}/suppress", {}, "suppress", ODD_ID),
    ("POST", f"/api/v1/customers/{ODD_ID_PATH}/unsuppress", {}, "unsuppress", ODD_ID),
    (
        "POST",
        "/api/v1/merge_customers",
        {"primary": {"id": "p1"}, "secondary": {"email": "s@example.com"}},
        "merge_customers",
        None,
    ),
    (
        "POST",
        "/api/v2/batch",
        {"batch": [{"type": "person", "action": "identify", "identifiers": {"id": "b1"}}]},
        "batch",
        None,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "operation", "customer_id"),
    TRACK_ROUTES,
    ids=[f"{r[3]}" for r in TRACK_ROUTES],
)
def test_every_track_route_is_recorded_with_operation_decoded_id_and_body(
    fake: FakeCustomerIO,
    track: requests.Session,
    method: str,
    path: str,
    body: Any,
    operation: str,
    customer_id: str | None,
) -> None:
    response = track.request(method, f"{fake.url}{path}?x=1", json=body)
    assert response.status_code == 200
    assert response.json() == {}
    [req] = fake.requests
    assert isinstance(req, RecordedRequest)
    assert (req.method, req.path, req.query) == (method, path, "x=1")
    assert req.operation == operation
    assert req.customer_id == customer_id
    assert req.json == body
    assert json.loads(req.body) == body
    assert req.headers["content-type"] == "application/json"
    assert req.fault is None
    [applied] = fake.applied
    assert isinstance(applied, AppliedOperation)
    expected_op = "batch:identify" if operation == "batch" else operation
    assert applied.operation == expected_op
    assert applied.json == (body["batch"][0] if operation == "batch" else body)


def test_applied_operations_carry_device_and_derived_customer_ids(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    track.put(f"{fake.url}/api/v1/customers/u1/devices", json={"device": {"id": "tok/2", "platform": "ios"}})
    track.delete(f"{fake.url}/api/v1/customers/u1/devices/tok%2F1", json={})
    track.post(
        f"{fake.url}/api/v1/merge_customers", json={"primary": {"email": "p@x"}, "secondary": {"id": 2}}
    )
    add, delete, merge = fake.wait_for_applied(3)
    assert (add.customer_id, add.device_id) == ("u1", "tok/2")
    assert (delete.customer_id, delete.device_id) == ("u1", "tok/1")
    assert merge.customer_id == "p@x"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(customer_id=st.text(min_size=1, max_size=40).filter(lambda t: t.strip(".") != ""))
def test_any_customer_id_round_trips_through_the_path(
    fake: FakeCustomerIO, track: requests.Session, customer_id: str
) -> None:
    fake.clear()
    assert identify(fake, track, customer_id).status_code == 200
    [req] = fake.requests
    assert req.customer_id == customer_id


@pytest.mark.parametrize("channel", ["email", "push", "sms", "whatsapp", "inbox_message", "in_app"])
def test_sdk_send_methods_get_a_delivery_id(
    fake: FakeCustomerIO, sdk: customerio.APIClient, channel: str
) -> None:
    body = {"transactional_message_id": 7, "identifiers": {"id": "u/7"}, "message_data": {"n": 1}}
    before = int(time.time())
    result = getattr(sdk, f"send_{channel}")(body)
    assert isinstance(result["delivery_id"], str) and result["delivery_id"]
    assert isinstance(result["queued_at"], int) and result["queued_at"] >= before
    [req] = fake.requests
    assert (req.method, req.path, req.api, req.operation) == (
        "POST",
        f"/v1/send/{channel}",
        "app",
        f"send_{channel}",
    )
    assert req.json == body
    assert req.headers["Authorization"] == f"Bearer {fake.app_api_key}"
    [applied] = fake.applied
    assert (applied.customer_id, applied.delivery_id) == ("u/7", result["delivery_id"])


def test_sdk_send_email_request_object_returns_unique_delivery_ids(
    fake: FakeCustomerIO, sdk: customerio.APIClient
) -> None:
    request = customerio.SendEmailRequest(
        transactional_message_id=3, identifiers={"id": "user-9"}, to="x@example.com", subject="Hi"
    )
    first = sdk.send_email(request)["delivery_id"]
    second = sdk.send_email(request)["delivery_id"]
    assert first != second
    assert fake.requests[0].json == {
        "transactional_message_id": 3,
        "identifiers": {"id": "user-9"},
        "to": "x@example.com",
        "subject": "Hi",
    }


def test_unknown_route_and_wrong_method_answer_404(fake: FakeCustomerIO, track: requests.Session) -> None:
    missing = track.post(f"{fake.url}/api/v1/nope", json={})
    wrong_method = track.get(f"{fake.url}/api/v1/customers/u1")
    assert (missing.status_code, wrong_method.status_code) == (404, 404)
    assert missing.json() == {"meta": {"error": "not found"}}
    assert [r.api for r in fake.requests] == ["unknown", "unknown"]
    assert [r.authorized for r in fake.requests] == [True, True]
    assert fake.applied == []


UNDOCUMENTED: list[tuple[str, str]] = [
    ("PUT", "/api/v1/customers/"),  # identify(".") once normalised
    ("DELETE", "/api/v1/customers/u1/"),  # delete_device("u1", "..") once normalised
    ("PUT", "/api/v1/customers"),
    ("POST", "/api/v1/customers/u1/events/"),
    ("POST", "/api/v1/events/"),
    ("DELETE", "/api/v1/customers/u1/devices/"),
    ("PUT", "/api/v1/customers/u1/devices/"),
    ("POST", "/api/v1/customers/u1/events/extra"),
    ("PUT", "/api/v1//customers/u1"),
    ("PUT", "/API/v1/customers/u1"),
    ("PUT", "/api/V1/customers/u1"),
    ("POST", "/api/v1/merge_customers/"),
    ("POST", "/api/v2/batch/"),
    ("POST", "/api/v2/entity/"),
    ("POST", "/api/v3/batch"),
    ("POST", "/v1/send/fax"),
    ("POST", "/v1/send/email/"),
    ("POST", "/v1/send"),
    ("GET", "/api/v1/customers/u1"),
    ("PATCH", "/api/v1/customers/u1"),
    ("POST", "/api/v1/customers/u1"),
    ("PUT", "/api/v1/customers/u1/events"),
    ("GET", "/api/v2/batch"),
    ("PUT", "/v1/send/email"),
    ("HEAD", "/api/v1/customers/u1"),
    ("OPTIONS", "/api/v1/customers/u1"),
    ("POST", "/"),
]


def raw_request(fake: FakeCustomerIO, method: str, target: str, body: Any = None) -> tuple[int, bytes]:
    """Send ``target`` byte for byte (requests would remove dot segments first)."""
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    try:
        payload = b"" if body is None else json.dumps(body).encode()
        token = base64.b64encode(f"{fake.site_id}:{fake.track_api_key}".encode()).decode()
        conn.request(method, target, body=payload or None, headers={
            "Authorization": f"Basic {token}", "Content-Type": "application/json",
        })
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "path"), UNDOCUMENTED, ids=[f"{m} {p}" for m, p in UNDOCUMENTED])
def test_every_undocumented_path_or_method_is_a_404(fake: FakeCustomerIO, method: str, path: str) -> None:
    status, body = raw_request(fake, method, path, None if method in ("GET", "HEAD", "OPTIONS") else {})
    assert status == 404
    if method != "HEAD":
        assert json.loads(body) == {"meta": {"error": "not found"}}
    [req] = fake.requests
    assert (req.api, req.operation, req.status) == ("unknown", None, 404)
    assert fake.applied == []


@pytest.mark.parametrize(
    ("target", "method", "route_path", "operation"),
    [
        ("/api/v1/customers/%2E%2E/events", "POST", "/api/v1/events", "track_anonymous"),
        ("/api/v1/customers/%2e%2e/events", "POST", "/api/v1/events", "track_anonymous"),
        ("/api/v1/customers/../events", "POST", "/api/v1/events", "track_anonymous"),
        ("/api/v1/customers/./u1", "PUT", "/api/v1/customers/u1", "identify"),
        ("/api/v1/customers/u1/devices/..", "DELETE", "/api/v1/customers/u1/", None),
        ("/api/v1/customers/.", "PUT", "/api/v1/customers/", None),
        ("/api/v1/customers/../../../v1/send/email", "POST", "/v1/send/email", "send_email"),
    ],
)
def test_dot_segments_are_resolved_like_a_server_before_routing(
    fake: FakeCustomerIO, target: str, method: str, route_path: str, operation: str | None
) -> None:
    raw_request(fake, method, target, {"name": "ev"})
    [req] = fake.requests
    assert (req.path, req.route_path, req.operation) == (target, route_path, operation)
    if operation is None:
        assert req.status == 404


def test_normalize_path_follows_rfc_3986() -> None:
    from cio_celery.testing.fake import normalize_path

    assert normalize_path("/a/b/c/./../../g") == "/a/g"
    assert normalize_path("/a/b/..") == "/a/"
    assert normalize_path("/a/b/.") == "/a/b/"
    assert normalize_path("/../a") == "/a"
    assert normalize_path("/a/%2E%2E/b") == "/b"
    assert normalize_path("/a/...") == "/a/..."
    assert normalize_path("/a/%252E%252E") == "/a/%252E%252E"  # what the SDK sends for "%2E%2E"


def test_v2_entity_applies_one_operation(fake: FakeCustomerIO, track: requests.Session) -> None:
    body = {"type": "person", "action": "event", "identifiers": {"id": "u1"}, "name": "ev",
            "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}
    assert track.post(f"{fake.url}/api/v2/entity", json=body).status_code == 200
    assert track.post(f"{fake.url}/api/v2/entity", json=body).status_code == 200  # same event id
    assert track.post(f"{fake.url}/api/v2/entity", json={"action": "identify"}).status_code == 400
    [applied] = fake.applied
    assert (applied.operation, applied.customer_id, applied.event_id) == ("entity:event", "u1", body["id"])
    assert fake.stats["duplicates_ignored"] == 1


def test_invalid_json_is_a_400_and_not_applied(fake: FakeCustomerIO, track: requests.Session) -> None:
    response = track.put(
        f"{fake.url}/api/v1/customers/u1", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"meta": {"error": "invalid json"}}
    [req] = fake.requests
    assert (req.status, req.json, req.body) == (400, None, b"{not json")
    assert fake.applied == []


def test_chunked_request_bodies_are_read(fake: FakeCustomerIO, track: requests.Session) -> None:
    chunks = iter([b'{"plan":', b'"pro"}'])
    response = track.put(f"{fake.url}/api/v1/customers/u1", data=chunks)
    assert response.status_code == 200
    assert fake.requests[0].json == {"plan": "pro"}


def test_keep_alive_serves_many_requests_on_one_connection(fake: FakeCustomerIO) -> None:
    auth = "Basic " + base64.b64encode(f"{fake.site_id}:{fake.track_api_key}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        sockets = []
        for i in range(3):
            # Includes a 401 and an injected failure: error answers must keep the connection in sync too.
            if i == 1:
                fake.fail_next(status=503)
            headers = {"Authorization": auth if i != 2 else "Basic eDp5"}
            conn.request("PUT", f"/api/v1/customers/u{i}", body=b'{"a": 1}', headers=headers)
            response = conn.getresponse()
            assert response.status == [200, 503, 401][i]
            response.read()
            assert response.getheader("Connection") is None
            sockets.append(conn.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets), "connection was not reused"
        close = {"Authorization": auth, "Connection": "close"}
        conn.request("PUT", "/api/v1/customers/last", body=b"{}", headers=close)
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Connection") == "close"
        response.read()
        assert conn.sock is None, "the client saw the server close the connection"
    finally:
        conn.close()
    assert [r.status for r in fake.requests] == [200, 503, 401, 200]


# ---------------------------------------------------------------- recording helpers


def test_requests_for_and_wait_for_requests_by_operation(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    identify(fake, track)
    track.post(f"{fake.url}/api/v1/customers/u1/events", json={"name": "e"})
    assert [r.operation for r in fake.requests_for("track")] == ["track"]
    assert len(fake.wait_for_requests(1, timeout=1, operation="identify")) == 1
    assert len(fake.wait_for_requests(2, timeout=1)) == 2


def test_wait_for_requests_wakes_up_when_a_request_arrives(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    timer = threading.Timer(0.2, lambda: identify(fake, track))
    timer.start()
    started = time.monotonic()
    try:
        [req] = fake.wait_for_requests(1, timeout=5)
    finally:
        timer.join()
    assert req.operation == "identify"
    assert time.monotonic() - started < 2


def test_wait_for_requests_times_out_with_a_useful_message(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    identify(fake, track)
    with pytest.raises(AssertionError, match=r"expected at least 2 'identify' requests within 0.2s, got 1"):
        fake.wait_for_requests(2, timeout=0.2, operation="identify")
    with pytest.raises(AssertionError, match=r"expected at least 5 applied operations"):
        fake.wait_for_applied(5, timeout=0.1)


def test_clear_forgets_records_and_seen_ids_but_keeps_faults(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    event = {"name": "e", "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"}
    track.post(f"{fake.url}/api/v1/customers/u1/events", json=event)
    fake.fail_next(status=500)
    fake.clear()
    assert (fake.requests, fake.applied, fake.stats["received"]) == ([], [], 0)
    assert identify(fake, track).status_code == 500, "faults survive clear()"
    assert track.post(f"{fake.url}/api/v1/customers/u1/events", json=event).status_code == 200
    assert [op.operation for op in fake.applied] == ["track"], "the seen event id was forgotten"


def test_stats_count_statuses_operations_and_faults(fake: FakeCustomerIO, track: requests.Session) -> None:
    identify(fake, track)
    fake.fail_next(status=429)
    identify(fake, track)
    requests.put(f"{fake.url}/api/v1/customers/u1", json={})
    stats = fake.stats
    assert stats["received"] == 3
    assert stats["applied"] == 1
    assert stats["by_status"] == {"200": 1, "429": 1, "401": 1}
    assert stats["by_operation"] == {"identify": 3}
    assert stats["by_fault"] == {"scripted": 1}


# ---------------------------------------------------------------- faults


def test_fail_next_answers_the_status_with_retry_after(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.fail_next(status=429, retry_after=3)
    fake.fail_next(status=503, retry_after=1.5)
    first, second, third = (identify(fake, track) for _ in range(3))
    assert (first.status_code, first.headers["Retry-After"]) == (429, "3")
    assert first.json() == {"meta": {"error": "injected failure"}}
    assert (second.status_code, second.headers["Retry-After"]) == (503, "1.5")
    assert third.status_code == 200 and "Retry-After" not in third.headers
    assert [r.fault for r in fake.requests] == ["scripted", "scripted", None]
    assert len(fake.applied) == 1, "failed requests are not applied"


def test_fail_next_sends_a_custom_body(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.fail_next(status=400, body={"meta": {"error": "email is invalid"}})
    fake.fail_next(status=502, body="<html>bad gateway</html>")
    first, second = identify(fake, track), identify(fake, track)
    assert first.json() == {"meta": {"error": "email is invalid"}}
    assert (second.status_code, second.text) == (502, "<html>bad gateway</html>")
    assert second.headers["Content-Type"].startswith("text/plain")


def test_fail_next_count_fails_that_many_requests(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.fail_next(3, status=500)
    codes = [identify(fake, track).status_code for _ in range(4)]
    assert codes == [500, 500, 500, 200]


def test_scripted_faults_are_one_fifo(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.fail_next(status=429)
    fake.reset_next()
    fake.timeout_next(delay=0.3)
    fake.fail_next(status=500)
    outcomes: list[Any] = []
    for _ in range(5):
        try:
            outcomes.append(identify(fake, track, timeout=5).status_code)
        except requests.ConnectionError:
            outcomes.append("reset")
    assert outcomes == [429, "reset", 200, 500, 200]
    assert [r.fault for r in fake.requests] == ["scripted", "reset", "timeout", "scripted", None]
    assert [r.status for r in fake.requests] == [429, None, 200, 500, 200]


def test_timeout_next_makes_the_client_time_out_but_the_op_is_applied(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    fake.timeout_next(delay=1.0)
    with pytest.raises(requests.Timeout):
        identify(fake, track, timeout=0.2)
    [req] = fake.requests
    assert (req.fault, req.status) == ("timeout", 200)
    assert [op.operation for op in fake.applied] == ["identify"]
    assert identify(fake, track, timeout=5).status_code == 200


def test_timeout_next_with_sdk_client_timeout(fake: FakeCustomerIO) -> None:
    fake.timeout_next(delay=1.0)
    client = customerio.APIClient(fake.app_api_key, url=fake.url, retries=0, timeout=0.2)
    with pytest.raises(customerio.CustomerIOException) as info:
        client.send_email({"transactional_message_id": 1, "identifiers": {"id": "u1"}})
    assert isinstance(info.value.__cause__, requests.Timeout)
    assert len(fake.applied) == 1


def test_reset_next_raises_connection_error_and_is_not_applied(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    fake.reset_next()
    with pytest.raises(requests.ConnectionError) as info:
        identify(fake, track)
    assert "reset" in str(info.value).lower() or "aborted" in str(info.value).lower()
    [req] = fake.requests
    assert (req.status, req.fault) == (None, "reset")
    assert fake.applied == []
    assert fake.stats["by_status"] == {"no_response": 1}
    assert identify(fake, track).status_code == 200, "the pool recovers on a fresh connection"


def test_failure_rate_fails_about_that_fraction(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.set_failure_rate(0.3, status=502, retry_after=1)
    codes = [identify(fake, track).status_code for _ in range(200)]
    failed = codes.count(502)
    assert 30 <= failed <= 90, failed
    assert codes.count(200) == 200 - failed
    assert len(fake.applied) == 200 - failed
    assert fake.stats["by_fault"] == {"failure_rate": failed}
    fake.set_failure_rate(0.0)
    assert all(identify(fake, track).status_code == 200 for _ in range(10))


def test_random_faults_mix_errors_and_slow_answers(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.set_random_faults(error_rate=0.4, statuses=(500, 503), timeout_rate=0.1, timeout_delay=0.01)
    codes = [identify(fake, track).status_code for _ in range(300)]
    by_fault = fake.stats["by_fault"]
    assert set(codes) == {200, 500, 503}
    assert 80 <= codes.count(500) + codes.count(503) <= 160
    assert 10 <= by_fault["random_timeout"] <= 55, by_fault
    assert by_fault["random_error"] == codes.count(500) + codes.count(503)
    assert len(fake.applied) == codes.count(200), "a slow answer is still applied"
    fake.clear_faults()
    assert all(identify(fake, track).status_code == 200 for _ in range(10))
    with pytest.raises(ValueError):
        fake.set_random_faults(error_rate=0.8, timeout_rate=0.3)


def test_failure_rate_is_reproducible_with_a_seed() -> None:
    patterns = []
    for _ in range(2):
        with FakeCustomerIO(seed=42) as fake, requests.Session() as session:
            session.auth = (fake.site_id, fake.track_api_key)
            fake.set_failure_rate(0.5)
            patterns.append([identify(fake, session).status_code for _ in range(30)])
    assert patterns[0] == patterns[1]
    assert 503 in patterns[0] and 200 in patterns[0]


def test_latency_delays_every_answer(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.set_latency(0.15)
    started = time.monotonic()
    assert identify(fake, track).status_code == 200
    assert time.monotonic() - started >= 0.15
    assert fake.requests[0].fault == "latency"
    fake.set_latency(0)
    started = time.monotonic()
    identify(fake, track)
    assert time.monotonic() - started < 0.15


def test_outage_with_duration_ends_by_itself(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.start_outage(duration=0.4, status=503, retry_after=2)
    during = identify(fake, track)
    assert (during.status_code, during.headers["Retry-After"]) == (503, "2")
    assert during.json() == {"meta": {"error": "injected outage"}}
    time.sleep(0.5)
    assert identify(fake, track).status_code == 200
    assert [r.fault for r in fake.requests] == ["outage", None]
    assert len(fake.applied) == 1


def test_outage_takes_precedence_over_scripted_faults_until_ended(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    fake.fail_next(status=500)
    fake.start_outage(status=429)
    assert [identify(fake, track).status_code for _ in range(3)] == [429, 429, 429]
    fake.end_outage()
    assert [identify(fake, track).status_code for _ in range(2)] == [500, 200]


def test_clear_faults_removes_every_fault(fake: FakeCustomerIO, track: requests.Session) -> None:
    fake.fail_next(5)
    fake.set_failure_rate(1.0)
    fake.set_latency(2.0)
    fake.start_outage()
    fake.fail_batch_items(lambda i, item: "bad")
    fake.clear_faults()
    started = time.monotonic()
    assert identify(fake, track).status_code == 200
    ops = {"batch": [{"type": "person", "action": "identify", "identifiers": {"id": "x"}}]}
    assert track.post(f"{fake.url}/api/v2/batch", json=ops).status_code == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        ("fail_next", {"count": -1}),
        ("fail_next", {"status": 42}),
        ("timeout_next", {"delay": -1}),
        ("set_failure_rate", {"rate": 1.5}),
        ("set_latency", {"seconds": -0.1}),
        ("start_outage", {"retry_after": -1}),
    ],
)
def test_invalid_fault_arguments_are_refused(fake: FakeCustomerIO, call: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        getattr(fake, call)(**kwargs)


# ---------------------------------------------------------------- dedup


def test_duplicate_event_id_is_answered_but_not_applied_twice(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    event = {"name": "paid", "data": {}, "id": "01J0000000000000000000000A"}
    url = f"{fake.url}/api/v1/customers/u1/events"
    assert track.post(url, json=event).status_code == 200
    assert track.post(url, json=event).status_code == 200
    anonymous = {"name": "paid", "id": "01J0000000000000000000000A", "anonymous_id": "a"}
    assert track.post(f"{fake.url}/api/v1/events", json=anonymous).status_code == 200
    no_id = {"name": "paid", "data": {}}
    assert track.post(url, json=no_id).status_code == 200
    assert track.post(url, json=no_id).status_code == 200
    assert [(op.operation, op.event_id) for op in fake.applied] == [
        ("track", "01J0000000000000000000000A"),
        ("track", None),
        ("track", None),
    ]
    assert fake.stats["duplicates_ignored"] == 2


def test_batch_event_ids_share_the_seen_set_with_v1(fake: FakeCustomerIO, track: requests.Session) -> None:
    track.post(f"{fake.url}/api/v1/customers/u1/events", json={"name": "e", "id": "E1"})
    batch = {
        "batch": [
            {"type": "person", "action": "event", "identifiers": {"id": "u1"}, "name": "e", "id": "E1"},
            {"type": "person", "action": "event", "identifiers": {"id": "u1"}, "name": "e", "id": "E2"},
            {"type": "person", "action": "page", "identifiers": {"id": "u1"}, "name": "/", "id": "E2"},
            {"type": "person", "action": "identify", "identifiers": {"id": "u1"}, "id": "E2"},
        ]
    }
    assert track.post(f"{fake.url}/api/v2/batch", json=batch).status_code == 200
    assert [(op.operation, op.event_id) for op in fake.applied] == [
        ("track", "E1"),
        ("batch:event", "E2"),
        ("batch:identify", None),
    ]
    assert fake.stats["duplicates_ignored"] == 2


# ---------------------------------------------------------------- v2 batch


def test_batch_applies_one_operation_per_item(fake: FakeCustomerIO, track: requests.Session) -> None:
    batch = {
        "batch": [
            {"type": "person", "action": "identify", "identifiers": {"email": "a@x"}, "attributes": {"p": 1}},
            {"type": "person", "action": "delete", "identifiers": {"id": 7}},
        ]
    }
    assert track.post(f"{fake.url}/api/v2/batch", json=batch).status_code == 200
    assert [(op.operation, op.customer_id) for op in fake.applied] == [
        ("batch:identify", "a@x"),
        ("batch:delete", "7"),
    ]
    assert fake.applied[0].json == batch["batch"][0]


def test_batch_item_errors_answer_207_and_apply_only_good_items(
    fake: FakeCustomerIO, track: requests.Session
) -> None:
    good = {"type": "person", "action": "identify", "identifiers": {"id": "ok"}}
    huge = {
        "type": "person",
        "action": "identify",
        "identifiers": {"id": "h"},
        "attributes": {"x": "y" * 32_001},
    }
    batch = {"batch": [good, {"action": "identify"}, huge, {"type": "person"}, good]}
    response = track.post(f"{fake.url}/api/v2/batch", json=batch)
    assert response.status_code == 207
    errors = response.json()["errors"]
    assert [(e["batch_index"], e["reason"], e["field"]) for e in errors] == [
        (1, "required", "type"),
        (2, "size_limit", ""),
        (3, "required", "action"),
    ]
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)
    assert [op.customer_id for op in fake.applied] == ["ok", "ok"]
    assert fake.requests[0].status == 207


def test_fail_batch_items_injects_item_errors(fake: FakeCustomerIO, track: requests.Session) -> None:
    seen: list[int] = []

    def predicate(index: int, item: dict[str, Any]) -> str | None:
        seen.append(index)
        return "invalid_identifier" if item["identifiers"]["id"].startswith("bad") else None

    fake.fail_batch_items(predicate)
    items = [{"type": "person", "action": "identify", "identifiers": {"id": i}} for i in ("a", "bad-1", "c")]
    response = track.post(f"{fake.url}/api/v2/batch", json={"batch": items})
    assert response.status_code == 207
    assert response.json()["errors"] == [
        {"batch_index": 1, "reason": "invalid_identifier", "field": "", "message": "injected item failure"}
    ]
    assert [op.customer_id for op in fake.applied] == ["a", "c"]
    assert seen == [0, 1, 2]
    fake.start_outage()
    track.post(f"{fake.url}/api/v2/batch", json={"batch": items})
    assert seen == [0, 1, 2], "the predicate only sees batches that reach normal handling"


def test_batch_over_500kb_is_a_413(fake: FakeCustomerIO, track: requests.Session) -> None:
    items = [
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": str(i)},
            "attributes": {"x": "y" * 20_000},
        }
        for i in range(26)
    ]
    response = track.post(f"{fake.url}/api/v2/batch", json={"batch": items})
    assert response.status_code == 413
    assert "error" in response.json()["meta"]
    assert fake.applied == []
    assert identify(fake, track).status_code == 200, "the connection stays in sync after a large body"


def test_batch_without_a_list_is_a_400(fake: FakeCustomerIO, track: requests.Session) -> None:
    assert track.post(f"{fake.url}/api/v2/batch", json={"batch": {}}).status_code == 400
    assert track.post(f"{fake.url}/api/v2/batch", json=[1]).status_code == 400


# ---------------------------------------------------------------- control endpoints


def test_control_endpoints(fake: FakeCustomerIO, track: requests.Session) -> None:
    control = f"{fake.url}/_fake"
    identify(fake, track)
    stats = requests.get(f"{control}/stats").json()
    assert stats["received"] == 1 and stats["applied"] == 1

    assert requests.post(
        f"{control}/fail_next", json={"count": 2, "status": 500, "retry_after": 4}
    ).json() == {"ok": True}
    first, second, third = (identify(fake, track) for _ in range(3))
    assert (first.status_code, first.headers["Retry-After"], second.status_code, third.status_code) == (
        500,
        "4",
        500,
        200,
    )

    requests.post(f"{control}/outage", json={"duration": None, "status": 429, "retry_after": None})
    assert identify(fake, track).status_code == 429
    requests.post(f"{control}/end_outage")
    assert identify(fake, track).status_code == 200

    requests.post(f"{control}/outage", json={"duration": 0.2, "status": 503, "retry_after": 1})
    assert identify(fake, track).status_code == 503
    time.sleep(0.3)
    assert identify(fake, track).status_code == 200

    requests.post(f"{control}/fail_next", json={})
    requests.post(f"{control}/clear_faults")
    assert identify(fake, track).status_code == 200

    applied = requests.get(f"{control}/applied").json()
    assert len(applied) == 5
    assert applied[0] == {
        "operation": "identify",
        "customer_id": "u1",
        "event_id": None,
        "json": {"plan": "pro"},
        "device_id": None,
        "delivery_id": None,
    }
    assert requests.get(f"{control}/stats").json()["received"] == 9, "control calls are not counted"

    assert requests.post(f"{control}/clear").status_code == 200
    assert requests.get(f"{control}/stats").json()["received"] == 0
    assert requests.get(f"{control}/applied").json() == []
    assert [r.api for r in fake.requests] == ["control"] * 3
    assert fake.wait_for_requests(0, timeout=0.1) == []


def test_control_endpoints_refuse_bad_input(fake: FakeCustomerIO) -> None:
    control = f"{fake.url}/_fake"
    assert requests.post(f"{control}/fail_next", json={"count": "two"}).status_code == 400
    assert requests.post(f"{control}/outage", json={"status": 9999}).status_code == 400
    assert requests.post(f"{control}/outage", data=b"{oops").status_code == 400
    assert requests.post(f"{control}/nope").status_code == 404
    assert requests.get(f"{control}/clear").status_code == 404


# ---------------------------------------------------------------- lifecycle and load


def test_stop_with_an_idle_keep_alive_session_returns_quickly() -> None:
    fake = FakeCustomerIO().start()
    with requests.Session() as session:
        session.auth = (fake.site_id, fake.track_api_key)
        assert identify(fake, session).status_code == 200  # leaves a pooled keep-alive connection open
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 2.0
        fake.stop()  # idempotent
        with pytest.raises(requests.ConnectionError):
            identify(fake, session, timeout=2)


def test_stop_interrupts_a_sleeping_timeout_fault() -> None:
    fake = FakeCustomerIO().start()
    fake.timeout_next(delay=30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            requests.put(f"{fake.url}/api/v1/customers/u", json={}, auth=(fake.site_id, fake.track_api_key))
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    fake.wait_for_requests(1, timeout=5)
    started = time.monotonic()
    fake.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()
    assert len(errors) == 1


def test_restart_keeps_the_port_and_records() -> None:
    with FakeCustomerIO() as fake, requests.Session() as session:
        session.auth = (fake.site_id, fake.track_api_key)
        url = fake.url
        identify(fake, session)
        fake.stop()
        assert not fake.running
        fake.start()
        assert fake.url == url
        assert identify(fake, session).status_code == 200
        assert len(fake.applied) == 2


def test_url_before_start_raises() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = FakeCustomerIO().url


def test_concurrent_clients_are_all_recorded(fake: FakeCustomerIO) -> None:
    per_client, clients = 100, 4
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with requests.Session() as session:
                session.auth = (fake.site_id, fake.track_api_key)
                for i in range(per_client):
                    body = {"name": "e", "id": f"{n}-{i}"}
                    response = session.post(f"{fake.url}/api/v1/customers/c{n}/events", json=body, timeout=5)
                    assert response.status_code == 200
        except BaseException as exc:
            failures.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert failures == []
    assert len(fake.wait_for_applied(per_client * clients, timeout=1)) == per_client * clients
    assert len({op.event_id for op in fake.applied}) == per_client * clients
    assert elapsed < 5, f"{per_client * clients} requests took {elapsed:.2f}s"


def test_the_server_logs_no_request_data(
    fake: FakeCustomerIO, track: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    identify(fake, track, "secret-person")
    fake.reset_next()
    with pytest.raises(requests.ConnectionError):
        identify(fake, track, "secret-person")
    out, err = capfd.readouterr()
    assert "secret-person" not in out + err
    assert "api/v1" not in out + err


# ---------------------------------------------------------------- fixtures and CLI


def test_fake_customerio_fixture_is_started(fake_customerio: FakeCustomerIO) -> None:
    assert fake_customerio.running
    assert requests.get(f"{fake_customerio.url}/_fake/stats").json()["received"] == 0


def test_fake_customerio_env_sets_the_variables(fake_customerio_env: FakeCustomerIO) -> None:
    fake = fake_customerio_env
    assert os.environ["CIO_SITE_ID"] == fake.site_id
    assert os.environ["CIO_TRACK_API_KEY"] == fake.track_api_key
    assert os.environ["CIO_APP_API_KEY"] == fake.app_api_key
    assert os.environ["CIO_TRACK_URL"] == fake.url
    assert os.environ["CIO_APP_URL"] == fake.url
    client = customerio.APIClient(os.environ["CIO_APP_API_KEY"], url=os.environ["CIO_APP_URL"], retries=0)
    assert client.send_sms({"transactional_message_id": 1, "identifiers": {"id": "u"}})["delivery_id"]


def test_plugin_works_from_a_users_conftest(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["cio_celery.testing.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import os, requests

            def test_env(fake_customerio_env):
                r = requests.put(os.environ["CIO_TRACK_URL"] + "/api/v1/customers/u1", json={},
                                 auth=(os.environ["CIO_SITE_ID"], os.environ["CIO_TRACK_API_KEY"]))
                assert r.status_code == 200
                assert fake_customerio_env.applied[0].customer_id == "u1"

            def test_env_is_restored():
                assert "CIO_TRACK_URL" not in os.environ

            seen = []

            def test_plain(fake_customerio):
                seen.append(fake_customerio)
                assert fake_customerio.running

            def test_previous_fake_was_stopped():
                assert seen and not seen[0].running
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_python_m_runs_in_the_foreground_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cio_celery.testing",
            "--port",
            "0",
            "--site-id",
            "s1",
            "--track-api-key",
            "k1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert (
            requests.put(f"{url}/api/v1/customers/u1", json={}, auth=("s1", "k1"), timeout=5).status_code
            == 200
        )
        assert requests.get(f"{url}/_fake/stats", timeout=5).json()["applied"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
