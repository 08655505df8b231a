"""Hostile calls through the public API with a real worker: reserved names and options, the
nesting limit end to end, and error paths free of customer data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals

import cio_celery
from cio_celery import ValidationError
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.validation import MAX_NESTING_DEPTH

EMAIL = "ada.lovelace@example.com"


@pytest.fixture()
def published() -> Iterator[list[str]]:
    names: list[str] = []

    def on_publish(sender: str | None = None, **_: Any) -> None:
        names.append(str(sender))

    signals.before_task_publish.connect(on_publish, weak=False)
    yield names
    signals.before_task_publish.disconnect(on_publish)


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


def refused(published: list[str], call: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        call()
    assert published == [], "nothing is published for a refused call"
    return info.value


# -- reserved names and options (finding 5 and 7) ------------------------------------------------


@pytest.mark.parametrize("meta", [{"key": "forged"}, {"key": "k", "slot": 10**12}, "mine"])
def test_callers_may_not_pass_the_reserved_cio_keyword(worker_app: Any, published: list[str], meta: Any) -> None:
    error = refused(published, lambda: cio_celery.identify.apply_async(("u1",), {"_cio": meta}))
    assert error.field == "_cio"
    error = refused(published, lambda: cio_celery.track.apply_async(("u1", "ev"), {"_cio": meta}))
    assert error.field == "_cio"


@pytest.mark.parametrize("serializer", ["pickle", "yaml", "msgpack", "bogus"])
def test_only_json_is_published_for_the_packages_tasks(
    worker_app: Any, published: list[str], all_logs: Any, serializer: str
) -> None:
    error = refused(published, lambda: cio_celery.identify.apply_async(("u1",), {"email": EMAIL},
                                                                      serializer=serializer))
    assert error.field == "serializer"
    assert EMAIL not in "\n".join(all_logs.texts)


def test_an_idempotency_key_over_150_bytes_is_refused(worker_app: Any, published: list[str]) -> None:
    for key in ("k" * 151, "é" * 76, "x" * 10_000_000):
        error = refused(published, lambda key=key: cio_celery.track.apply_async(("u1", "ev"), idempotency_key=key))
        assert error.field == "idempotency_key"
    cio_celery.track.apply_async(("u1", "ev"), idempotency_key="k" * 150)
    assert published == ["cio_celery.track"]


@pytest.mark.parametrize(("op", "args"), [("identify", ("u1",)), ("pageview", ("u1", "/p")),
                                          ("backfill", ("u1", "ev", 1_700_000_000)),
                                          ("add_device", ("u1", "tok", "ios"))])
def test_an_attribute_named_self_is_refused_not_lost_in_the_worker(
    worker_app: Any, published: list[str], op: str, args: tuple[Any, ...]
) -> None:
    error = refused(published, lambda: getattr(cio_celery, op).apply_async(args, {"self": "x", "plan": "pro"}))
    assert error.field in ("attributes.self", "data.self")


# -- nesting, end to end (finding 2) --------------------------------------------------------------


def test_the_deepest_allowed_payload_is_delivered_and_one_more_level_is_refused(
    worker_app: Any, fake: FakeCustomerIO, published: list[str]
) -> None:
    deep_ok = nested(MAX_NESTING_DEPTH - 1)  # data is level 1
    cio_celery.track.delay("u1", "ev", {"x": deep_ok})
    [applied] = fake.wait_for_applied(1)
    assert applied.json["data"] == {"x": deep_ok}
    published.clear()
    error = refused(published, lambda: cio_celery.track.delay("u1", "ev", {"x": nested(MAX_NESTING_DEPTH)}))
    assert (error.field, error.problem) == (
        "data[<key 0>]",
        f"is nested more than {MAX_NESTING_DEPTH} levels deep (or contains itself); "
        f"the limit is {MAX_NESTING_DEPTH} levels",
    )
    # The 485 levels, and a payload that contains itself: refused, nothing published.
    refused(published, lambda: cio_celery.identify.delay("u1", deep=nested(485)))
    looped: dict[str, Any] = {}
    looped["me"] = looped
    refused(published, lambda: cio_celery.send_email.delay(
        {"transactional_message_id": 1, "identifiers": {"id": "u1"}, "message_data": looped}))
    time.sleep(0.5)
    assert len(fake.requests) == 1
    assert DeadLetters(settings_for_app(worker_app), worker_app).count() == 0


# -- error paths hold no customer data (finding 7) -----------------------------------------------


def test_error_paths_never_show_keys_of_customer_data(worker_app: Any, published: list[str]) -> None:
    data = {"a": 1, "b": 2, "c": 3, EMAIL: float("inf")}
    error = refused(published, lambda: cio_celery.track.delay("u1", "ev", data))
    assert str(error) == "track: data[<key 3>] is infinite, which is not JSON-serialisable"
    error = refused(published, lambda: cio_celery.identify.apply_async(("u1",), {EMAIL: {1, 2}}))
    assert str(error) == "identify: attributes[<key 0>] is of type set, which is not JSON-serialisable"
    error = refused(published, lambda: cio_celery.send_email.delay({
        "transactional_message_id": 1, "identifiers": {"id": "u1"},
        "message_data": {"orders": {EMAIL: [b"x"]}},
    }))
    assert str(error) == "send_email: request.message_data[<key 0>][<key 0>][0] is of type bytes, which is not " \
        "JSON-serialisable"
    for text in (str(error), repr(error), error.field):
        assert "ada" not in text and "example.com" not in text
