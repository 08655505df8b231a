"""A Prometheus collector reading cio_celery's shared state from Redis on every scrape.

    from prometheus_client import start_http_server
    from cio_celery.contrib.prometheus import register
    register(app)            # in a web process or a sidecar, not necessarily a worker
    start_http_server(9108)

The figures are cluster-wide (they live in Redis), so one scrape target is enough; scraping
them from every process gives the same numbers. ``cio_celery_spool_depth`` is the exception:
it is the enqueue spool of the machine the collector runs on. No label carries customer
data: labels are operation names, retry reasons and breaker states.

``collect()`` never raises: when the store cannot be read (unreachable, misconfigured) it
yields ``cio_celery_store_up 0`` and leaves the store's families out of that scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..breaker import Breaker
from ..deadletters import DeadLetters
from ..fallback import Fallback
from ..settings import Settings, settings_for_app
from ..spool import spool_depth
from ..store import key, redis_for

__all__ = ["BREAKER_STATES", "TRIPS_TOTAL_FIELD", "CioCollector", "register"]

logger = logging.getLogger("cio_celery.prometheus")

BREAKER_STATES = ("closed", "half-open", "open")

# The field of the breaker's hash counting every automatic trip, never reset. The breaker's
# own ``trips`` field cannot serve as a counter: it is the run of trips that sets the next open
# period and starts again from 1 once the breaker stayed closed long enough.
TRIPS_TOTAL_FIELD = "trips_total"


class CioCollector(Collector):  # type: ignore[misc]
    """Breaker state, time left and trips; fallback depth; dead letters; spool depth;
    suppressed duplicates by operation and retries by reason; ``cio_celery_store_up``."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self._settings = settings
        self._last_error: str | None = None

    @property
    def settings(self) -> Settings:
        return self._settings or settings_for_app(self.app)

    def describe(self) -> list[Metric]:
        return []  # collected live: no scrape of Redis when the collector is registered

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cio_celery_store_up", "1 when the cio_celery Redis store answered this scrape.")
        try:
            families = list(self._from_store(self.settings))
        except Exception as exc:  # noqa: BLE001 - a scrape reports the store down, it never raises
            families = []
            up.add_metric([], 0)
            self._note_error(type(exc).__name__)
        else:
            up.add_metric([], 1)
            self._note_error(None)
        yield up
        yield from families
        spool = GaugeMetricFamily("cio_celery_spool_depth",
                                  "Operations waiting in this host's local enqueue spool (broker unreachable).")
        try:
            spool.add_metric([], spool_depth(self.app))
        except Exception:  # noqa: BLE001, S110 - an unreadable spool is left out of this scrape
            pass
        else:
            yield spool

    def _note_error(self, error: str | None) -> None:
        # Once per change, not once per scrape: a store down for an hour is one line.
        if error != self._last_error and error is not None:
            logger.warning("cio_celery prometheus: store unreadable (%s); cio_celery_store_up is 0", error,
                           extra={"cio_event": "metrics_store_unavailable", "cio_error": error})
        self._last_error = error

    def _from_store(self, s: Settings) -> Iterator[Metric]:
        client = redis_for(s)
        if s.breaker_enabled:
            breaker = Breaker(s)
            status = breaker.status()
            state = GaugeMetricFamily("cio_celery_breaker_state",
                                      "1 for the cluster breaker's current state, 0 for the others.", labels=["state"])
            for name in BREAKER_STATES:
                state.add_metric([name], 1 if status.state == name else 0)
            yield state
            left = GaugeMetricFamily(
                "cio_celery_breaker_time_left_seconds",
                "Seconds until the open breaker lets probes through; 0 when not open or due, -1 when opened by hand.",
            )
            left.add_metric([], status.time_left)
            yield left
            raw_total: Any = client.hget(key(s, "breaker", breaker.name), TRIPS_TOTAL_FIELD)
            trips = CounterMetricFamily("cio_celery_breaker_trips",
                                        "Times the breaker opened by itself (failures), cluster-wide.")
            trips.add_metric([], int(raw_total or 0))
            yield trips
        depth = GaugeMetricFamily("cio_celery_fallback_depth",
                                  "Operations parked in Redis while the breaker was open, not yet released.")
        depth.add_metric([], Fallback(s, self.app).depth())
        yield depth
        dead = GaugeMetricFamily("cio_celery_dead_letters", "Operations waiting in dead letters for a human.")
        dead.add_metric([], DeadLetters(s, self.app).count())
        yield dead
        raw: Any = client.hgetall(key(s, "stats"))
        suppressed = CounterMetricFamily("cio_celery_suppressed_duplicates",
                                         "Operations skipped because their idempotency key was already delivered.",
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
