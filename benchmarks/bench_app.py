"""The Celery app the throughput benchmark's workers run (configured by environment).

Two tasks deliver the same ``track`` call: ``cio_celery.track`` (validation, claim, breaker,
limiter, retries) and ``bench.bare_track``, a bare Celery task calling the SDK directly, as a
team without cio_celery would write it. Same app, same worker settings.
"""

from __future__ import annotations

import os
from typing import Any

import customerio
from celery import Celery

from cio_celery.checks import recommended_celery_config

app = Celery("cio_bench", broker=os.environ["CELERY_BROKER_URL"], include=["cio_celery.tasks"])
app.conf.update(recommended_celery_config(), task_ignore_result=True, worker_hijack_root_logger=False)

_client: customerio.CustomerIO | None = None


def _sdk() -> customerio.CustomerIO:
    global _client
    if _client is None:
        _client = customerio.CustomerIO(
            os.environ["CIO_SITE_ID"], os.environ["CIO_TRACK_API_KEY"], retries=0, timeout=10,
        )
        _client.base_url = os.environ["CIO_TRACK_URL"].rstrip("/") + "/api/v1"
    return _client


@app.task(name="bench.bare_track", acks_late=True, ignore_result=True)
def bare_track(customer_id: str, name: str, data: dict[str, Any] | None = None) -> None:
    _sdk().track(customer_id, name, data or {})


_counter: Any = None


@app.task(name="bench.noop", acks_late=True, ignore_result=True)
def noop(seq: int) -> None:
    """The ceiling of any design sending one Celery message per operation: one Redis write."""
    global _counter
    if _counter is None:
        import redis

        _counter = redis.Redis.from_url(os.environ.get("CIO_REDIS_URL") or os.environ["CELERY_BROKER_URL"])
    _counter.incr("bench:noop")
