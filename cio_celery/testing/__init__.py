"""Test helpers shipped with cio_celery: a fake Customer.io server and pytest fixtures for it.

The fixtures live in :mod:`cio_celery.testing.pytest_plugin`; enable them with
``pytest_plugins = ["cio_celery.testing.pytest_plugin"]`` in your top-level conftest.py.
"""

from cio_celery.testing.fake import AppliedOperation, FakeCustomerIO, RecordedRequest

__all__ = ["AppliedOperation", "FakeCustomerIO", "RecordedRequest"]
