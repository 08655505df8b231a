"""A Prometheus collector reading cio_celery's shared state from Redis on every scrape.

    from prometheus_client import start_http_server
    from cio_celery.contrib.prometheus import register
    register(app)            # in a web process or a sidecar, not necessarily a worker
    start_http_server(9108)

The figures are cluster-wide (they live in Redis), so one scrape target is enough; scraping
them from every process gives the same numbers. No label carries customer data: labels are
operation names, retry reasons and breaker states.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ..breaker import Breaker
from ..deadletters import DeadLetters
from ..fallback import Fallback
from ..settings import Settings, settings_for_app
from ..spool import spool_depth
from ..store import key, redis_for

__all__ = ["BREAKER_STATES", "CioCollector", "register"]

BREAKER_STATES = ("closed", "half-open", "open")


class CioCollector(Collector):  # type: ignore[misc]
    """Breaker state, time left and trips; fallback depth; dead letters; spool depth;
    suppressed duplicates and retries by reason; ``cio_celery_store_up``."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self._settings = settings

    @property
    def settings(self) -> Settings:
        return self._settings or settings_for_app(self.app)

    def describe(self) -> list[Any]:
        return []  # collected live: no registration-time scrape of Redis

    def collect(self) -> Iterator[Any]:
        s = self.settings
        up = GaugeMetricFamily("cio_celery_store_up", "1 when the Redis store answered this scrape.")
        try:
            families = list(self._from_store(s))
        except (redis.RedisError, OSError):
            families = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        spool = GaugeMetricFamily("cio_celery_spool_depth", "Operations in this host's local enqueue spool.")
        try:
            spool.add_metric([], spool_depth(self.app))
        except Exception:  # noqa: BLE001, S110 - an unreadable spool is left out of this scrape
            pass
        else:
            yield spool

    def _from_store(self, s: Settings) -> Iterator[Any]:
        if s.breaker_enabled:
            status = Breaker(s).status()
            state = GaugeMetricFamily("cio_celery_breaker_state", "1 for the breaker's current state.",
                                      labels=["state"])
            for name in BREAKER_STATES:
                state.add_metric([name], 1 if status.state == name else 0)
            yield state
            left = GaugeMetricFamily("cio_celery_breaker_time_left_seconds",
                                     "Seconds until the open breaker lets probes through (-1: opened by hand).")
            left.add_metric([], status.time_left)
            yield left
            trips = CounterMetricFamily("cio_celery_breaker_trips", "Times the breaker opened since its last reset.")
            trips.add_metric([], status.trips)
            yield trips
        depth = GaugeMetricFamily("cio_celery_fallback_depth", "Operations parked while the breaker was open.")
        depth.add_metric([], Fallback(s, self.app).depth())
        yield depth
        dead = GaugeMetricFamily("cio_celery_dead_letters", "Operations waiting in dead letters.")
        dead.add_metric([], DeadLetters(s, self.app).count())
        yield dead
        raw: Any = redis_for(s).hgetall(key(s, "stats"))
        suppressed = CounterMetricFamily("cio_celery_suppressed_duplicates",
                                         "Operations skipped because their idempotency key was done.",
                                         labels=["operation"])
        retries = CounterMetricFamily("cio_celery_retries", "Retries scheduled, by reason.", labels=["reason"])
        for field, value in sorted(raw.items()):
            kind, _, name = bytes(field).decode().partition(":")
            if kind == "suppressed":
                suppressed.add_metric([name], int(value))
            elif kind == "retry":
                retries.add_metric([name], int(value))
        yield suppressed
        yield retries


def register(app: Any, registry: CollectorRegistry = REGISTRY, settings: Settings | None = None) -> CioCollector:
    """Register a :class:`CioCollector` for ``app`` on ``registry`` and return it."""
    collector = CioCollector(app, settings)
    registry.register(collector)
    return collector
