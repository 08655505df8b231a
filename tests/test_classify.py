"""Classification: 2xx delivered, 408/429/5xx/timeouts/connection transient, other 4xx permanent."""

from __future__ import annotations

import email.utils
import time

import pytest
import requests

from cio_celery.classify import classify, parse_retry_after
from cio_celery.exceptions import PermanentError, TransientError
from cio_celery.testing.redis_server import free_port


@pytest.mark.parametrize("status", [200, 201, 204, 207, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify("track", status=status) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_408_429_and_5xx_are_transient(status: int) -> None:
    err = classify("track", status=status, headers={"Retry-After": "7"})
    assert isinstance(err, TransientError)
    assert err.status == status
    assert err.retry_after == 7.0
    assert err.reason == f"http_{status}"
    assert err.maybe_applied is (status >= 500)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_other_4xx_are_permanent(status: int) -> None:
    err = classify("identify", status=status)
    assert isinstance(err, PermanentError)
    assert str(err) == f"identify: http_{status}"


def test_timeouts_and_connection_errors_are_transient() -> None:
    read = classify("track", exc=requests.ReadTimeout("x"))
    connect = classify("track", exc=requests.ConnectTimeout("x"))
    conn = classify("track", exc=requests.ConnectionError("reset"))
    assert isinstance(read, TransientError) and read.maybe_applied and read.reason == "timeout"
    assert isinstance(connect, TransientError) and not connect.maybe_applied
    assert isinstance(conn, TransientError) and conn.reason == "connection"


def test_a_refused_connection_was_not_sent() -> None:
    port = free_port()  # bound then released: nothing listens there now
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)
    err = classify("track", exc=info.value)
    assert isinstance(err, TransientError)
    assert err.maybe_applied is False


def test_other_request_errors_are_permanent_and_name_only_the_type() -> None:
    err = classify("track", exc=requests.exceptions.InvalidURL("http://secret@host/?q=person@example.com"))
    assert isinstance(err, PermanentError)
    assert "person@example.com" not in str(err) and "secret" not in repr(err)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("12", 12.0), ("1.5", 1.5), ("-3", 0.0), ("soon", None), ("inf", None)],
)
def test_parse_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    now = time.time()
    header = email.utils.formatdate(now + 120, usegmt=True)
    got = parse_retry_after(header, now=now)
    assert got is not None and 118 <= got <= 121


def test_classify_needs_an_outcome() -> None:
    with pytest.raises(ValueError):
        classify("track")
