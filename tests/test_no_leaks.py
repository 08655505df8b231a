"""Failing deliveries leak no API key, email or attribute value into logs, exceptions or Flower."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
from celery import signals

import cio_celery
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from tests.conftest import RecordingHandler
from tests.helpers import wait_until

EMAIL = "leaky.person+cio@example.com"
ATTRIBUTE = "attr-value-that-must-not-leak-42"
PERSON = "person-id-that-must-not-leak-7"


@pytest.fixture()
def failures() -> Any:
    seen: list[BaseException] = []

    def on_failure(exception: BaseException | None = None, **_: Any) -> None:
        if exception is not None:
            seen.append(exception)

    def on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
        if isinstance(reason, BaseException):
            seen.append(reason)

    signals.task_failure.connect(on_failure, weak=False)
    signals.task_retry.connect(on_retry, weak=False)
    yield seen
    signals.task_failure.disconnect(on_failure)
    signals.task_retry.disconnect(on_retry)


@pytest.fixture()
def published() -> Any:
    headers: list[dict[str, Any]] = []

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        headers_list.append(dict(headers or {}))

    headers_list = headers
    signals.before_task_publish.connect(on_publish, weak=False)
    yield headers
    signals.before_task_publish.disconnect(on_publish)


def test_failing_deliveries_leak_no_secret_or_customer_data(
    worker_app: Any,
    fake: FakeCustomerIO,
    all_logs: RecordingHandler,
    failures: list[BaseException],
    published: list[dict[str, Any]],
) -> None:
    fake.fail_next(1, status=400, body={"meta": {"error": f"email {EMAIL} is invalid"}})
    fake.fail_next(1, status=503)
    fake.fail_next(1, status=429, retry_after=0)
    fake.reset_next(1)
    fake.fail_next(1, status=500)
    fake.fail_next(5, status=401)
    cio_celery.identify.delay(PERSON, email=EMAIL, plan=ATTRIBUTE)
    cio_celery.track.delay(PERSON, "signed_up", {"email": EMAIL, "plan": ATTRIBUTE})
    cio_celery.send_email.delay({"transactional_message_id": 1, "identifiers": {"email": EMAIL},
                                 "to": EMAIL, "message_data": {"plan": ATTRIBUTE}})
    store = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_until(lambda: store.count() == 3, timeout=20, what="three dead letters")

    texts = list(all_logs.texts)
    for record in all_logs.records:
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    for exc in failures:
        texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])
    for headers in published:
        texts.append(str(headers.get("argsrepr")))
        texts.append(str(headers.get("kwargsrepr")))
    for entry in store.list():
        texts.append(repr(entry))
        texts.append(str(entry.summary()))

    assert failures, "the scenario must produce failures to inspect"
    assert any(getattr(r, "cio_event", None) == "retry" for r in all_logs.records)
    secrets = [fake.track_api_key, fake.app_api_key, EMAIL, ATTRIBUTE, PERSON]
    blob = "\n".join(texts)
    for secret in secrets:
        assert secret not in blob, f"leaked {secret!r}"


def test_an_invalid_foreign_message_is_dead_lettered_without_its_keys_in_the_reason(
    worker_app: Any, fake: FakeCustomerIO, all_logs: RecordingHandler, failures: list[BaseException]
) -> None:
    """A message published around enqueue validation (an older producer) with customer data as
    dict keys: the worker's validation names the field by position, in the dead letter's
    reason, the logs and the task's exception."""
    from celery import Task

    deep: Any = "leaf"
    for _ in range(40):
        deep = [deep]
    data = {"plan": ATTRIBUTE, EMAIL: deep}
    result = Task.apply_async(cio_celery.track, (PERSON, "ev", data), {"_cio": {"key": "foreign-2"}}, queue="cio")
    store = DeadLetters(settings_for_app(worker_app), worker_app)
    wait_until(lambda: store.count() == 1, timeout=20, what="one dead letter")
    [entry] = store.list()
    assert (entry.task_id, entry.reason) == (result.id, "invalid:data[<key 1>]")
    texts = [entry.reason, str(entry.summary()), *all_logs.texts]
    for record in all_logs.records:
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    texts.extend(f"{exc!s} {exc!r}" for exc in failures)
    blob = "\n".join(texts)
    for secret in (EMAIL, ATTRIBUTE, PERSON, "lovelace", "leaky.person"):
        assert secret not in blob, f"leaked {secret!r}"
    assert fake.requests == []
