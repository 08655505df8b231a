"""Pytest fixtures for code that talks to Customer.io, backed by :class:`FakeCustomerIO`.

Enable them in your top-level ``conftest.py``::

    pytest_plugins = ["cio_celery.testing.pytest_plugin"]
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cio_celery.testing.fake import FakeCustomerIO

__all__ = ["fake_customerio", "fake_customerio_env"]


@pytest.fixture
def fake_customerio() -> Iterator[FakeCustomerIO]:
    """A started FakeCustomerIO on a free loopback port (seed 0), stopped after the test."""
    with FakeCustomerIO(seed=0) as fake:
        yield fake


@pytest.fixture
def fake_customerio_env(
    fake_customerio: FakeCustomerIO, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeCustomerIO]:
    """``fake_customerio`` with the ``CIO_*`` environment variables pointing at it."""
    monkeypatch.setenv("CIO_SITE_ID", fake_customerio.site_id)
    monkeypatch.setenv("CIO_TRACK_API_KEY", fake_customerio.track_api_key)
    monkeypatch.setenv("CIO_APP_API_KEY", fake_customerio.app_api_key)
    monkeypatch.setenv("CIO_TRACK_URL", fake_customerio.track_url)
    monkeypatch.setenv("CIO_APP_URL", fake_customerio.app_url)
    yield fake_customerio
