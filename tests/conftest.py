"""Shared fixtures: a real redis-server, the fake Customer.io, and a Celery worker over both."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cio_celery.settings import configure
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer

pytest_plugins = ["cio_celery.testing.pytest_plugin"]

# The README's test command (and CI) runs every kind of scenario once; CIO_FULL=1 adds the long
# variants (marked ``full``): every fault mode at every store command, and every chaos scenario
# with the store on a Redis Cluster and with RabbitMQ as the broker (docs/chaos.md).
FULL_RUN = os.environ.get("CIO_FULL") == "1"


# Under pytest-xdist (scripts/test.sh: -n 2 --dist loadgroup) the scenarios that run worker
# subprocesses through faults, kills and outages go one at a time, in one process.
# test_breaker_cluster measures calls inside breaker windows of about a second; the health, CLI
# and Flower tests wait on real workers with short timeouts (two runs in parallel met them).
SERIAL_FILES = {"test_faults.py", "test_time_limit.py", "test_warm_shutdown.py", "test_breaker_cluster.py",
                "test_health.py", "test_cli.py", "test_flower.py"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="a long variant (CIO_FULL=1 runs it)")
    for item in items:
        if item.get_closest_marker("full") is not None and not FULL_RUN:
            item.add_marker(skip)
        if item.get_closest_marker("chaos") is not None or item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.xdist_group("serial"))

BROKER_DB = 0
STORE_DB = 1


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """``CIO_TEST_REDIS_URL`` when CI started Redis, else a private redis-server (always
    private under pytest-xdist: each process's fixtures use the same database numbers)."""
    url = os.environ.get("CIO_TEST_REDIS_URL")
    if url and not os.environ.get("PYTEST_XDIST_WORKER"):
        yield url.rstrip("/")
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def broker_url(redis_base_url: str) -> str:
    return f"{redis_base_url}/{BROKER_DB}"


@pytest.fixture(scope="session")
def store_url(redis_base_url: str) -> str:
    return f"{redis_base_url}/{STORE_DB}"


@pytest.fixture(scope="session")
def fake_cio_session() -> Iterator[FakeCustomerIO]:
    fake = FakeCustomerIO(site_id="site-123", track_api_key="trk-SECRET-key-1", app_api_key="app-SECRET-key-2")
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def celery_config(
    broker_url: str, store_url: str, fake_cio_session: FakeCustomerIO, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return {
        "cio_spool_dir": str(tmp_path_factory.mktemp("spool")),
        "broker_url": broker_url,
        # Only the embedded worker's ping check stores a result; our tasks ignore results.
        "result_backend": f"{broker_url.rsplit('/', 1)[0]}/2",
        "broker_transport_options": {"visibility_timeout": 3600},
        "broker_connection_retry_on_startup": True,
        "cio_redis_url": store_url,
        "cio_site_id": fake_cio_session.site_id,
        "cio_track_api_key": fake_cio_session.track_api_key,
        "cio_app_api_key": fake_cio_session.app_api_key,
        "cio_track_url": fake_cio_session.url,
        "cio_app_url": fake_cio_session.url,
        "cio_timeout": 2.0,
        "cio_retry_backoff_base": 0.05,
        "cio_retry_backoff_max": 0.2,
        "cio_max_retries": 3,
        # Tests enqueue bursts; a rescheduled (rate-limited) task would land in the next test.
        # The limiter has tests of its own (tests/test_limiter.py).
        "cio_rate_limit_track": 0,
        "cio_rate_limit_transactional": 0,
    }


@pytest.fixture(scope="session")
def celery_includes() -> list[str]:
    return ["cio_celery.tasks"]


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"queues": ("cio", "cio.send", "cio.fallback", "celery"), "shutdown_timeout": 10.0}


@pytest.fixture()
def store(store_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture()
def fake(fake_cio_session: FakeCustomerIO) -> Iterator[FakeCustomerIO]:
    fake_cio_session.clear_faults()
    fake_cio_session.clear()
    yield fake_cio_session
    fake_cio_session.clear_faults()


@pytest.fixture()
def worker_app(celery_session_app: Any, celery_session_worker: Any, store: redis.Redis, fake: FakeCustomerIO) -> Any:
    """The session app with a running embedded worker, a clean store and a clean fake.

    It is made the current app: the package's tasks are shared tasks, so ``cio_celery.track``
    publishes through the current app, and another test may have made its own app current (with
    Celery 5.4, a later test's ``.delay()`` then went to that app's default broker).
    """
    configure(celery_session_app)
    celery_session_app.set_current()
    return celery_session_app


class RecordingHandler(logging.Handler):
    """Collects every log record, formatted with its traceback, from every thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))


@pytest.fixture()
def all_logs() -> Iterator[RecordingHandler]:
    handler = RecordingHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)
