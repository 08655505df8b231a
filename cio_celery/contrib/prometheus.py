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

The health report's verdict comes with it: ``cio_celery_healthy``, ``cio_celery_problem{name}``
(1 for each named problem of :mod:`cio_celery.health`, 0 for the others), and the depth and
consumers of the ``cio``, ``cio.send`` and ``cio.fallback`` queues read from the broker (consumers on Redis
from the workers' answers, cached for ``workers_cache`` seconds).

A family that reads a key holding data it cannot read (a damaged ledger or quarantine key) is
left out of that scrape; the health families name it (``<section>_unreadable``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..breaker import Breaker
from ..deadletters import DeadLetters
from ..fallback import Fallback
from ..health import DEFAULT_WORKERS_CACHE, PROBLEM_NAMES, health_report, ledger_figures
from ..quarantine import Quarantine
from ..settings import Settings, settings_for_app
from ..spool import spool_stats
from ..store import key, redis_for

__all__ = ["BREAKER_STATES", "CORRUPT_RESETS_FIELD", "TRIPS_TOTAL_FIELD", "CioCollector", "register"]

logger = logging.getLogger("cio_celery.prometheus")

BREAKER_STATES = ("closed", "half-open", "open")

# The field of the breaker's hash counting every automatic trip, never reset. The breaker's
# own ``trips`` field cannot serve as a counter: it is the run of trips that sets the next open
# period and starts again from 1 once the breaker stayed closed long enough.
TRIPS_TOTAL_FIELD = "trips_total"
# The field counting the times the breaker's state could not be read and was reset to closed.
CORRUPT_RESETS_FIELD = "corrupt_resets"


class CioCollector(Collector):  # type: ignore[misc]
    """Breaker state, time left, trips and corrupt resets; fallback depth; dead letters; the store's
    quarantine; the delivery ledger; suppressed duplicates by operation and retries by reason;
    ``cio_celery_store_up``; the health verdict; this host's spool (depth, quarantine, bytes, cap)."""

    def __init__(
        self, app: Any, settings: Settings | None = None, *, health: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self._settings = settings
        self._last_error: str | None = None
        #: Keyword arguments of health_report (thresholds, ``ignore`` ...) for the health families.
        self.health_options: dict[str, Any] = {"workers_cache": DEFAULT_WORKERS_CACHE, **(health or {})}

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
        yield from self._health()
        yield from self._spool()

    def _spool(self) -> Iterator[Metric]:
        try:
            stats = spool_stats(self.app, self._settings)
        except Exception:  # noqa: BLE001 - an unreadable spool is left out of this scrape
            return
        for name, text, value in (
            ("cio_celery_spool_depth", "Operations waiting in this host's local enqueue spool (broker unreachable).",
             stats.depth),
            ("cio_celery_spool_quarantine", "Operations of this host's spool quarantined after failing "
             "spool_max_attempts times with the broker answering (cio spool list).", stats.quarantined),
            ("cio_celery_spool_bytes", "Bytes of messages held by this host's spool, quarantine included.",
             stats.bytes),
            ("cio_celery_spool_max_bytes", "The spool's cap (spool_max_bytes): at it, .delay() raises EnqueueError.",
             stats.cap),
        ):
            family = GaugeMetricFamily(name, text)
            family.add_metric([], value)
            yield family

    def _health(self) -> Iterator[Metric]:
        try:
            report = health_report(self.app, self._settings, **self.health_options)
        except Exception:  # noqa: BLE001 - health_report does not raise; a bad option must not fail a scrape
            return
        healthy = GaugeMetricFamily("cio_celery_healthy", "1 when the health report finds no problem (as /cio/health).")
        healthy.add_metric([], 1 if report.healthy else 0)
        yield healthy
        problem = GaugeMetricFamily("cio_celery_problem",
                                    "1 for each named problem of the health report, 0 for the others.", labels=["name"])
        found = set(report.problem_names)
        for name in PROBLEM_NAMES:
            problem.add_metric([name], 1 if name in found else 0)
        yield problem
        if report.queues:
            depth = GaugeMetricFamily("cio_celery_queue_depth", "Messages waiting in the queue, read from the broker.",
                                      labels=["queue"])
            consumers = GaugeMetricFamily("cio_celery_queue_consumers",
                                          "Workers consuming the queue (Redis: those that answered the broadcast).",
                                          labels=["queue"])
            for name, q in report.queues.items():
                depth.add_metric([name], q.get("depth") or 0)
                if q.get("consumers") is not None:
                    consumers.add_metric([name], q["consumers"])
            yield depth
            yield consumers

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
            # Read after the status script, which resets a damaged state (counted) first.
            raw_total, raw_resets = client.hmget(key(s, "breaker", breaker.name),
                                                 [TRIPS_TOTAL_FIELD, CORRUPT_RESETS_FIELD])
            trips = CounterMetricFamily("cio_celery_breaker_trips",
                                        "Times the breaker opened by itself (failures), cluster-wide.")
            trips.add_metric([], _int(raw_total))
            yield trips
            resets = CounterMetricFamily(
                "cio_celery_breaker_corrupt_resets",
                "Times the breaker's shared state could not be read and was reset to closed, cluster-wide.",
            )
            resets.add_metric([], _int(raw_resets))
            yield resets
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
        batch: dict[str, int] = {}
        for field, value in sorted(raw.items()):
            kind, _, name = bytes(field).decode().partition(":")
            if kind == "suppressed":
                suppressed.add_metric([name], int(value))
            elif kind == "retry":
                retries.add_metric([name], int(value))
            elif kind in ("batch", "delivered", "enqueue"):
                batch[f"{kind}:{name}"] = int(value)
        yield suppressed
        yield retries
        yield from _batching(batch)
        yield from self._quarantine(s)
        yield from self._ledger(s)

    def _quarantine(self, s: Settings) -> Iterator[Metric]:
        try:
            count = Quarantine(s).count()
        except (redis.ResponseError, ValueError):  # a damaged key: health names it
            return
        family = GaugeMetricFamily("cio_celery_quarantine",
                                   "Store entries that could not be read, waiting for a human (cio quarantine list).")
        family.add_metric([], count)
        yield family

    def _ledger(self, s: Settings) -> Iterator[Metric]:
        try:
            figures = ledger_figures(self.app, s)
        except (redis.ResponseError, ValueError):  # a damaged key: health names it
            return
        if figures is None:  # the ledger is off (a broker other than Redis, CIO_LEDGER=0)
            return
        for name, text, value in (
            ("cio_celery_ledger_depth", "Operations in flight recorded in the delivery ledger.", figures["depth"]),
            ("cio_celery_ledger_overdue", "Ledger entries past their due time that the sweeper has not looked at yet.",
             figures["overdue"]),
            ("cio_celery_ledger_oldest_overdue_seconds", "Seconds the most overdue ledger entry is past its due "
             "time; 0 when none is.", figures["oldest_overdue_seconds"]),
        ):
            family = GaugeMetricFamily(name, text)
            family.add_metric([], value)
            yield family


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def register(
    app: Any, registry: CollectorRegistry = REGISTRY, settings: Settings | None = None,
    health: dict[str, Any] | None = None,
) -> CioCollector:
    """Register a :class:`CioCollector` for ``app`` on ``registry`` and return it.

    ``health`` holds keyword arguments of :func:`cio_celery.health.health_report`
    (``max_dead_letters``, ``ignore=("app_credentials_missing",)`` ...).
    """
    collector = CioCollector(app, settings, health=health)
    registry.register(collector)
    return collector


def _batching(stats: dict[str, int]) -> Iterator[Metric]:
    """Adaptive batching: requests, the operations they carried, their sizes, and the singles."""
    from ..batching import SIZE_BUCKETS

    requests = CounterMetricFamily("cio_celery_batch_requests", "/api/v2/batch requests that delivered operations.")
    requests.add_metric([], stats.get("batch:requests", 0))
    yield requests
    ops = CounterMetricFamily("cio_celery_delivered", "Operations delivered, by path (batch or single).",
                              labels=["path"])
    ops.add_metric(["batch"], stats.get("batch:delivered", 0))
    ops.add_metric(["single"], stats.get("delivered:single", 0))
    yield ops
    appended = CounterMetricFamily("cio_celery_appended_at_enqueue",
                                   "Operations that .delay() appended to the batching buffer instead of "
                                   "publishing a message (past the rate limit).")
    appended.add_metric([], stats.get("enqueue:appended", 0))
    yield appended
    sizes = GaugeMetricFamily("cio_celery_batch_size_requests",
                              "Batch requests by the operations they delivered (at most le).", labels=["le"])
    for b in SIZE_BUCKETS:
        sizes.add_metric([str(b)], stats.get(f"batch:size_le_{b}", 0))
    yield sizes
