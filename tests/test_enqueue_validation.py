"""Bad input fails in the caller at .delay()/.apply_async()/signatures, and nothing is published."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import customerio
import pytest
from celery import signals

import cio_celery
from cio_celery import ValidationError

LONG_ID = "p" * 151
DOTS = "is made only of dots, which would change the request's URL path"
DEPTH = "is nested more than 32 levels deep (or contains itself); the limit is 32 levels"
DEEP: Any = 1
for _ in range(500):
    DEEP = [DEEP]
EMAIL_REQ = {"transactional_message_id": 1, "identifiers": {"id": "u1"}}

# (task, args, kwargs, field, message) -- one row per rule; the message is asserted whole.
RULES: list[tuple[str, tuple[Any, ...], dict[str, Any], str, str]] = [
    ("identify", ("",), {}, "id", "identify: id must not be blank"),
    ("identify", (None,), {}, "id", "identify: id must not be None"),
    ("identify", (LONG_ID,), {}, "id", "identify: id is 151 bytes; the limit is 150 bytes"),
    ("identify", (True,), {}, "id", "identify: id is of type bool; must be a str or an int"),
    ("identify", ("u1",), {f"a{i}": i for i in range(301)}, "attributes",
     "identify: attributes has 301 attributes; the limit is 300"),
    ("identify", ("u1",), {"n" * 151: 1}, "attributes[<key 0>]",
     "identify: attributes[<key 0>] name is 151 bytes; the limit is 150 bytes"),
    ("identify", ("u1",), {"bio": "x" * 1001}, "attributes[<key 0>]",
     "identify: attributes[<key 0>] is 1001 bytes; the limit is 1000 bytes"),
    ("identify", ("u1",), {"tags": {1, 2}}, "attributes[<key 0>]",
     "identify: attributes[<key 0>] is of type set, which is not JSON-serialisable"),
    ("identify", ("u1",), {"email": "x" * 1001}, "attributes.email",
     "identify: attributes.email is 1001 bytes; the limit is 1000 bytes"),
    ("identify", ("u1",), {"ada.lovelace@example.com": float("inf")}, "attributes[<key 0>]",
     "identify: attributes[<key 0>] is infinite, which is not JSON-serialisable"),
    ("identify", ("..",), {}, "id", f"identify: id {DOTS}"),
    ("identify", (".",), {}, "id", f"identify: id {DOTS}"),
    ("track", ("u1", ""), {}, "name", "track: name must not be blank"),
    ("track", ("u1", "e" * 101), {}, "name", "track: name is 101 bytes; the limit is 100 bytes"),
    ("track", ("u1", "ev", {"blob": "x" * 100_000}), {}, "data",
     "track: data is 100011 bytes as JSON; the limit is 100000 bytes"),
    ("track", ("..", "evt"), {}, "customer_id", f"track: customer_id {DOTS}"),
    ("track", ("u1", "ev", {"nest": DEEP}), {}, "data[<key 0>]", f"track: data[<key 0>] {DEPTH}"),
    ("track", ("u1", "ev", ["not", "a", "dict"]), {}, "data",
     "track: data is of type list; must be a dict or None"),
    ("track", ("u1", "ev"), {"id": "not-a-ulid"}, "id",
     "track: id must be a ULID (26 Crockford base32 characters)"),
    ("track", ("u1", "ev"), {"timestamp": 1_700_000_000_000}, "timestamp",
     "track: timestamp is 10**10 or more, which looks like milliseconds; give seconds"),
    ("track", ("u1", "ev"), {"timestamp": "yesterday"}, "timestamp",
     "track: timestamp is a string that is not a whole number; must be unix seconds"),
    ("track", ("u1", "ev"), {"colour": "red"}, "colour", "track: colour is not an argument of track"),
    ("track", ("u1",), {}, "name", "track: name is required"),
    ("track_anonymous", (LONG_ID, "ev"), {}, "anonymous_id",
     "track_anonymous: anonymous_id is 151 bytes; the limit is 150 bytes"),
    ("pageview", ("u1", "/" + "p" * 100), {}, "page", "pageview: page is 101 bytes; the limit is 100 bytes"),
    ("pageview", ("...", "/p"), {}, "customer_id", f"pageview: customer_id {DOTS}"),
    ("backfill", ("..", "ev", 1), {}, "customer_id", f"backfill: customer_id {DOTS}"),
    ("delete", ("..",), {}, "customer_id", f"delete: customer_id {DOTS}"),
    ("suppress", ("..",), {}, "customer_id", f"suppress: customer_id {DOTS}"),
    ("unsuppress", (".",), {}, "customer_id", f"unsuppress: customer_id {DOTS}"),
    ("add_device", ("..", "tok", "ios"), {}, "customer_id", f"add_device: customer_id {DOTS}"),
    ("add_device", ("u1", "..", "ios"), {}, "device_id", f"add_device: device_id {DOTS}"),
    ("delete_device", ("victim", ".."), {}, "device_id", f"delete_device: device_id {DOTS}"),
    ("delete_device", (".", "tok"), {}, "customer_id", f"delete_device: customer_id {DOTS}"),
    ("backfill", ("u1", "ev", None), {}, "timestamp", "backfill: timestamp must not be None"),
    ("backfill", ("u1", "ev", -5), {}, "timestamp", "backfill: timestamp is negative; must be unix seconds (>= 0)"),
    ("delete", ("",), {}, "customer_id", "delete: customer_id must not be blank"),
    ("suppress", (LONG_ID,), {}, "customer_id", "suppress: customer_id is 151 bytes; the limit is 150 bytes"),
    ("unsuppress", (None,), {}, "customer_id", "unsuppress: customer_id must not be None"),
    ("add_device", ("u1", "tok", "windows"), {}, "platform", "add_device: platform must be 'ios' or 'android'"),
    ("add_device", ("u1", "", "ios"), {}, "device_id", "add_device: device_id must not be blank"),
    ("delete_device", ("u1", None), {}, "device_id", "delete_device: device_id must not be None"),
    ("merge_customers", ("phone", "u1", "id", "u2"), {}, "primary_id_type",
     "merge_customers: primary_id_type must be one of 'id', 'email', 'cio_id'"),
    ("merge_customers", ("id", "u1", "email", ""), {}, "secondary_id",
     "merge_customers: secondary_id must not be blank"),
    ("batch", ([],), {}, "operations", "batch: operations must not be empty"),
    ("batch", ([{"type": "person", "identifiers": {"id": "u"}, "action": "identify",
                 "attributes": {"x": "y" * 32_000}}],), {}, "operations[0]",
     "batch: operations[0] is 32084 bytes as JSON; the limit is 32000 bytes"),
    ("batch", ([{"type": "person", "identifiers": {"id": "u"}, "action": "identify",
                 "attributes": {"x": "y" * 31_000}}] * 17,), {}, "operations",
     "batch: operations make a 528456-byte request body; the limit is 500000 bytes"),
    ("send_email", ({"identifiers": {"id": "u1"}},), {}, "request.transactional_message_id",
     "send_email: request.transactional_message_id is required"),
    ("send_email", ({"transactional_message_id": 1},), {}, "request.identifiers",
     "send_email: request.identifiers is required"),
    ("send_sms", (customerio.SendEmailRequest(transactional_message_id=1, identifiers={"id": "u"}),), {},
     "request", "send_sms: request is a SendEmailRequest; send_sms takes a dict or a SendSMSRequest"),
    ("send_push", ({**EMAIL_REQ, "message_data": {"when": datetime.now(timezone.utc).date()}},), {},
     "request.message_data[<key 0>]",
     "send_push: request.message_data[<key 0>] is of type date, which is not JSON-serialisable"),
]


@pytest.fixture()
def published() -> Iterator[list[str]]:
    names: list[str] = []

    def on_publish(sender: str | None = None, **_: Any) -> None:
        names.append(str(sender))

    signals.before_task_publish.connect(on_publish, weak=False)
    yield names
    signals.before_task_publish.disconnect(on_publish)


@pytest.mark.parametrize(("name", "args", "kwargs", "field", "message"), RULES,
                         ids=[f"{r[0]}:{r[3][:30]}" for r in RULES])
def test_bad_input_raises_in_the_caller_and_publishes_nothing(
    celery_session_app: Any, published: list[str], name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
    field: str, message: str,
) -> None:
    task = getattr(cio_celery, name)
    for publish in (lambda: task.delay(*args, **kwargs),
                    lambda: task.apply_async(args, kwargs),
                    lambda: task.s(*args, **kwargs).apply_async()):
        with pytest.raises(ValidationError) as info:
            publish()
        assert str(info.value) == message
        assert info.value.field == field
        assert isinstance(info.value, ValueError)
    assert published == []


def test_a_valid_call_is_published_so_the_signal_check_can_fail(
    celery_session_app: Any, published: list[str]
) -> None:
    cio_celery.track.delay("u1", "ev")
    assert published == ["cio_celery.track"]


def test_a_blank_idempotency_key_is_refused(celery_session_app: Any, published: list[str]) -> None:
    with pytest.raises(ValidationError, match="idempotency_key must be a non-blank string"):
        cio_celery.track.apply_async(("u1", "ev"), idempotency_key=" ")
    assert published == []


def test_the_reserved_metadata_keyword_is_refused(celery_session_app: Any, published: list[str]) -> None:
    with pytest.raises(ValidationError, match="_cio is reserved"):
        cio_celery.identify.delay("u1", _cio="mine")
    assert published == []
