"""Hostile ids never reach another endpoint: refused at enqueue, refused again by the client
(defence in depth), and proved against the URL the fake actually received."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest
from celery import signals

import cio_celery
from cio_celery import PermanentError, ValidationError
from cio_celery.client import ROUTES, AppClient, TrackClient, route_problem
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import build_settings, settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.validation import PATH_ID_FIELDS
from tests.helpers import wait_until

DOTS = "is made only of dots, which would change the request's URL path"

# The reproductions, and the other path-id operations with dot ids.
MISROUTES: list[tuple[str, tuple[Any, ...], str]] = [
    ("track", ("..", "evt"), "customer_id"),
    ("identify", (".",), "id"),
    ("delete_device", ("victim", ".."), "device_id"),
    ("suppress", ("..",), "customer_id"),
    ("unsuppress", ("...",), "customer_id"),
    ("add_device", ("..", "tok", "ios"), "customer_id"),
    ("add_device", ("u1", "..", "android"), "device_id"),
    ("delete", ("..",), "customer_id"),
    ("pageview", ("..", "/p"), "customer_id"),
    ("backfill", (".", "ev", 1_700_000_000), "customer_id"),
    ("delete_device", ("..", "tok"), "customer_id"),
]


@pytest.fixture()
def published() -> Iterator[list[str]]:
    names: list[str] = []

    def on_publish(sender: str | None = None, **_: Any) -> None:
        names.append(str(sender))

    signals.before_task_publish.connect(on_publish, weak=False)
    yield names
    signals.before_task_publish.disconnect(on_publish)


def test_every_path_id_operation_has_a_misroute_case() -> None:
    assert {op for op, _, _ in MISROUTES} == set(PATH_ID_FIELDS)
    assert {(op, f) for op, _, f in MISROUTES} == {(op, f) for op, fs in PATH_ID_FIELDS.items() for f in fs}


@pytest.mark.parametrize(("op", "args", "field"), MISROUTES, ids=[f"{m[0]}:{m[2]}" for m in MISROUTES])
def test_dot_ids_are_refused_at_enqueue_and_nothing_reaches_the_fake(
    worker_app: Any, fake: FakeCustomerIO, published: list[str], op: str, args: tuple[Any, ...], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        getattr(cio_celery, op).delay(*args)
    assert (info.value.field, info.value.problem) == (field, DOTS)
    assert published == []
    # A valid call after it is delivered, so an empty fake means "nothing sent", not "too early".
    cio_celery.identify.delay("after")
    fake.wait_for_applied(1)
    assert [(r.method, r.path) for r in fake.requests] == [("PUT", "/api/v1/customers/after")]


# Ids that are odd but legal: each must arrive as exactly one segment of the documented route.
ODD_IDS = ["a/..", "../x", "%2E%2E", "%2e", "..x", " .. ", ".\u2024.", "\uff0e\uff0e", "x?y#z", "a;b", "\u00e9t\u00e9",
           "%", "~", "a b", "\\..", "..\\", 42]


def test_odd_ids_reach_exactly_the_documented_route(worker_app: Any, fake: FakeCustomerIO) -> None:
    for value in ODD_IDS:
        cio_celery.identify.delay(value)
        cio_celery.track.delay(value, "ev")
        cio_celery.delete_device.delay(value, value)
        cio_celery.add_device.delay(value, value, "ios")
        cio_celery.suppress.delay(value)
    count = 5 * len(ODD_IDS)
    fake.wait_for_applied(count, timeout=30)
    requests = fake.requests
    assert len(requests) == count and all(r.status == 200 for r in requests)
    by_op: dict[str, list[Any]] = {}
    for request in requests:
        assert request.route_path == request.path, "a dot segment was resolved on the way"
        method, template = ROUTES[str(request.operation)]
        pattern = re.escape(template).replace(re.escape("{id}"), "([^/]+)")
        match = re.fullmatch(pattern, request.path)
        assert request.method == method and match is not None, (request.method, request.operation)
        by_op.setdefault(str(request.operation), []).append([unquote(g) for g in match.groups()])
    expected = sorted([str(v)] for v in ODD_IDS)
    assert sorted(by_op["identify"]) == expected
    assert sorted(by_op["track"]) == expected
    assert sorted(by_op["suppress"]) == expected
    assert sorted(by_op["add_device"]) == expected
    assert sorted(by_op["delete_device"]) == sorted([str(v), str(v)] for v in ODD_IDS)


# -- defence in depth: the client refuses a URL that is not the operation's route -----------


def clients(fake: FakeCustomerIO) -> tuple[TrackClient, AppClient]:
    settings = build_settings({
        "site_id": fake.site_id, "track_api_key": fake.track_api_key, "app_api_key": fake.app_api_key,
        "track_url": fake.url, "app_url": fake.url, "redis_url": "redis://127.0.0.1:1/0",
    }, environ={})
    return TrackClient(settings), AppClient(settings)


CLIENT_MISROUTES: list[tuple[str, tuple[Any, ...]]] = [
    ("identify", ("..",)),
    ("identify", (".",)),
    ("track", ("..", "evt")),
    ("delete", ("..",)),
    ("add_device", ("..", "tok", "ios")),
    ("delete_device", ("victim", "..")),
    ("delete_device", ("..", "tok")),
    ("suppress", ("..",)),
    ("unsuppress", ("..",)),
    ("pageview_with_id", ("..", "/p", None, {})),
    ("backfill_with_id", ("..", "ev", 1, None, {})),
]


@pytest.mark.parametrize(("method", "args"), CLIENT_MISROUTES, ids=[f"{m}:{a[:2]}" for m, a in CLIENT_MISROUTES])
def test_the_client_refuses_to_send_a_request_off_its_route(
    fake: FakeCustomerIO, method: str, args: tuple[Any, ...]
) -> None:
    track, _ = clients(fake)
    with pytest.raises(PermanentError) as info:
        getattr(track, method)(*args)
    assert info.value.reason == "invalid:url"
    assert ".." not in str(info.value) and "victim" not in str(info.value)
    assert fake.requests == []
    track.close()


def test_the_client_sends_every_documented_route(fake: FakeCustomerIO) -> None:
    track, app = clients(fake)
    track.identify("u1", self="an attribute named self", id_="x")
    track.track("u1", "ev")
    track.track_anonymous("..", "ev")  # the anonymous id goes in the body
    track.pageview_with_id("u1", "/p", None, {})
    track.backfill_with_id("u1", "ev", 1, None, {})
    track.delete("u1")
    track.add_device("u1", "tok", "ios", self=1)
    track.delete_device("u1", "tok")
    track.suppress("u1")
    track.unsuppress("u1")
    track.merge_customers("id", "..", "id", ".")
    track.batch([{"type": "person", "action": "identify", "identifiers": {"id": ".."}}])
    for op in ("send_email", "send_push", "send_sms", "send_whatsapp", "send_inbox_message", "send_in_app"):
        getattr(app, op)({"transactional_message_id": 1, "identifiers": {"id": "u1"}})
    assert [r.status for r in fake.requests] == [200] * 18
    assert fake.requests[0].json == {"self": "an attribute named self", "id_": "x"}
    assert fake.requests[6].json == {"device": {"self": 1, "id": "tok", "platform": "ios"}}
    track.close()
    app.close()


def test_route_problem_accepts_only_the_operations_route() -> None:
    base = "https://track.customer.io"
    assert route_problem("identify", "PUT", f"{base}/api/v1/customers/u1", base) is None
    assert route_problem("identify", "PUT", f"{base}/api/v1/customers/{quote('a/b', safe='')}", base) is None
    assert route_problem("track", "POST", f"{base}/api/v1/events", base) == (
        "the request is not POST /api/v1/customers/{id}/events"
    )
    assert route_problem("identify", "PUT", f"{base}/api/v1/customers/", base) is not None
    assert route_problem("identify", "PUT", f"{base}/api/v1/customers/..", base) is not None
    assert route_problem("identify", "PUT", f"{base}/api/v1/customers/%2E%2E", base) is not None
    assert route_problem("identify", "POST", f"{base}/api/v1/customers/u1", base) is not None
    assert route_problem("identify", "PUT", "https://evil.example/api/v1/customers/u1", base) is not None
    # A base URL with a path prefix: the route is below it.
    assert route_problem("batch", "POST", "http://h:1/cio/api/v2/batch", "http://h:1/cio") is None
    assert route_problem("batch", "POST", "http://h:1/api/v2/batch", "http://h:1/cio") is not None
    # Without an operation, any documented route of that method.
    assert route_problem(None, "POST", f"{base}/api/v1/events", base) is None
    assert route_problem(None, "POST", f"{base}/api/v1/customers/u1/delete", base) is not None


@pytest.mark.parametrize(("op", "args", "field"), MISROUTES[:4], ids=[m[0] for m in MISROUTES[:4]])
def test_a_foreign_message_with_a_dot_id_is_dead_lettered_not_sent(
    worker_app: Any, fake: FakeCustomerIO, op: str, args: tuple[Any, ...], field: str
) -> None:
    """A message published around our validation (an older or foreign producer) is checked
    again in the worker: dead-lettered with the field named, never sent."""
    from celery import Task

    task = getattr(cio_celery, op)
    result = Task.apply_async(task, args, {"_cio": {"key": "foreign-1"}}, queue="cio")
    store = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_until(lambda: store.count() == 1, timeout=20, what="one dead letter")
    [entry] = store.list()
    assert (entry.task_id, entry.reason) == (result.id, f"invalid:{field}")
    assert fake.requests == []
