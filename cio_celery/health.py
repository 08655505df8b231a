"""One health report for the Django view, the Flask blueprint, the CLI and Prometheus.

Healthy means nothing below is wrong. Each problem has a name, a message and the fix:

- ``configuration_invalid``: the settings do not validate (named by the variable set);
- ``store_not_configured``, ``store_unavailable``, ``<section>_unreadable``: the Redis store;
- ``breaker_open``, ``breaker_half_open``: the cluster's circuit breaker is not closed;
- ``broker_unreachable``: nothing answers at the broker's address from this host;
- ``broker_publish_failing``: the broker answers but this process cannot publish to it
  (a transport that cannot be imported, refused credentials, a read-only or full Redis);
- ``queue_not_consumed``: no worker consumes ``cio``, ``cio.send`` or ``cio.fallback`` (one per queue);
- ``track_credentials_missing``, ``app_credentials_missing``: the workers (or, when none
  answers, this process) lack the credentials of an operation family;
- ``spool_stale``: this host's enqueue spool holds operations older than ``max_spool_age``;
- ``spool_quarantine_not_empty``: rows of this host's spool failed ``spool_max_attempts`` times
  with the broker answering and wait for an operator;
- ``spool_near_full``: this host's spool holds at least 80 % of ``spool_max_bytes``;
- ``dead_letters_near_full``, ``fallback_near_full``: the dead letters hold at least 80 % of
  ``dead_letter_max`` or ``dead_letter_max_bytes``, the fallback 80 % of ``fallback_max_bytes``
  (when full they refuse: the operations wait, retried every minute);
- ``quarantine_not_empty``: store entries that could not be read (fallback, dead letters,
  batch items) wait for an operator;
- ``ledger_overdue``: operations of the delivery ledger stayed overdue longer than
  ``max_ledger_overdue`` (no fallback releaser sweeps it);
- ``dead_letters_over_threshold``, ``fallback_over_threshold``: a threshold given is passed.

The breaker's ``corrupt_resets`` (its shared state could not be read and was reset to closed)
is reported with the breaker, not judged.

Queue depths are read from the broker. Consumers too, where the broker counts them (AMQP's
``queue_declare``); Redis does not, so the workers are asked (one ``cio_status`` broadcast,
answered by every worker that imports cio_celery, bounded by ``inspect_timeout`` and
cached ``workers_cache`` seconds). :func:`health_report` never raises: a section that
fails is a named problem.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from .breaker import breaker_for
from .checks import REMOTE_COMMAND, credential_gaps, where_set
from .deadletters import DeadLetters
from .exceptions import ConfigurationError
from .fallback import Fallback
from .idempotency import Claims
from .ledger import grace_of, ledger_enabled
from .quarantine import Quarantine
from .settings import QUEUE_SETTINGS, Settings, settings_for_app
from .spool import spool_stats
from .store import key, redis_for

__all__ = [
    "DEFAULT_INSPECT_TIMEOUT",
    "DEFAULT_MAX_SPOOL_AGE",
    "DEFAULT_WORKERS_CACHE",
    "PROBLEM_NAMES",
    "SPOOL_NEAR_FULL",
    "HealthReport",
    "Problem",
    "forget_workers",
    "health_report",
    "ledger_figures",
]

#: Seconds an operation may wait in this host's spool before ``spool_stale``.
DEFAULT_MAX_SPOOL_AGE = 60.0
#: Seconds the ``cio_status`` broadcast waits for the workers' answers (it always waits that long:
#: the number of workers is not known). Celery's own ``inspect`` waits 1 s; a loaded worker host
#: can answer later, and a missed answer reads as ``queue_not_consumed``.
DEFAULT_INSPECT_TIMEOUT = 2.0
#: Seconds the workers' answers are reused (a load balancer polls every few seconds).
DEFAULT_WORKERS_CACHE = 10.0
#: Share of ``spool_max_bytes`` from which this host's spool is ``spool_near_full``.
SPOOL_NEAR_FULL = 0.8

PROBLEM_NAMES = (
    "configuration_invalid", "store_not_configured", "store_unavailable", "breaker_unreadable",
    "fallback_unreadable", "dead_letters_unreadable", "stats_unreadable", "breaker_open", "breaker_half_open",
    "broker_unreachable", "broker_publish_failing", "queue_not_consumed", "workers_unreadable",
    "track_credentials_missing", "app_credentials_missing", "spool_stale", "spool_unreadable",
    "spool_quarantine_not_empty", "spool_near_full", "dead_letters_near_full", "fallback_near_full",
    "quarantine_not_empty", "quarantine_unreadable",
    "ledger_overdue", "ledger_unreadable", "dead_letters_over_threshold", "fallback_over_threshold",
    "health_check_failed",
)

_PROBE_KEY = "_cio_celery.health.publish_probe"


@dataclass(frozen=True)
class Problem:
    """One reason the system is not healthy: a stable ``name``, what is wrong, and how to fix it."""

    name: str
    message: str
    fix: str
    #: The setting (environment variable or Celery setting) to change, when there is one.
    setting: str | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.message} (fix: {self.fix})"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class HealthReport:
    problems: list[Problem]
    breaker: dict[str, Any] | None = None
    fallback_depth: int | None = None
    dead_letters: int | None = None
    spool_depth: int | None = None
    suppressed_duplicates: dict[str, int] = field(default_factory=dict)
    #: Seconds the oldest operation of this host's spool has waited (None: empty or unread).
    spool_oldest_seconds: float | None = None
    #: ``{"transport", "reachable", "publish_ok"}``; None when not checked.
    broker: dict[str, Any] | None = None
    #: ``{queue: {"depth", "consumers", "workers"}}`` for ``cio``, ``cio.send`` and ``cio.fallback``.
    queues: dict[str, dict[str, Any]] | None = None
    #: ``{"track": bool, "app": bool, "source": "workers" | "this process"}``.
    credentials: dict[str, Any] | None = None
    #: Problems found but not judged (``ignore=``), e.g. ``app_credentials_missing`` for Track-only use.
    ignored: list[Problem] = field(default_factory=list)
    #: Whether the store answered (the CLI exits 3 when it did not).
    store_up: bool = False
    #: Store entries that could not be read, waiting in the quarantine (``cio quarantine list``).
    quarantine: int | None = None
    #: ``{"depth", "overdue", "oldest_overdue_seconds", "grace", "max_overdue"}`` of the delivery ledger;
    #: None when it is off.
    ledger: dict[str, Any] | None = None
    #: Rows of this host's spool in its quarantine, and the bytes it holds of its cap.
    spool_quarantined: int | None = None
    spool_bytes: int | None = None
    spool_max_bytes: int | None = None
    #: Adaptive batching: ``{"buffer", "batch_requests", "batched", "single", "batched_share",
    #: "per_request", "appended_at_enqueue"}`` (operations delivered in batches and alone, and
    #: those ``.delay()`` appended to the buffer, since the stats were last reset).
    batching: dict[str, Any] | None = None

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def http_status(self) -> int:
        return 200 if self.healthy else 503

    @property
    def problem_names(self) -> list[str]:
        return [p.name for p in self.problems]

    def with_problems(self, *problems: Problem) -> HealthReport:
        """The same report with more problems (e.g. an integration's own configuration)."""
        return replace(self, problems=[*problems, *self.problems])

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "healthy": self.healthy,
            "problems": [p.as_dict() for p in self.problems],
            "breaker": self.breaker,
            "fallback_depth": self.fallback_depth,
            "dead_letters": self.dead_letters,
            "spool_depth": self.spool_depth,
            "spool_oldest_seconds": self.spool_oldest_seconds,
            "spool_quarantined": self.spool_quarantined,
            "spool_bytes": self.spool_bytes,
            "spool_max_bytes": self.spool_max_bytes,
            "quarantine": self.quarantine,
            "ledger": self.ledger,
            "batching": self.batching,
            "suppressed_duplicates": dict(self.suppressed_duplicates),
            "broker": self.broker,
            "queues": self.queues,
            "credentials": self.credentials,
            "ignored": [p.as_dict() for p in self.ignored],
        }


def unhealthy(problem: Problem) -> HealthReport:
    """A report that holds only ``problem`` (when nothing else could be read)."""
    return HealthReport(problems=[problem])


def configuration_problem(exc: ConfigurationError, app: Any = None, setting: str | None = None) -> Problem:
    """``configuration_invalid`` naming where the bad value is set (``CIO_TIMEOUT``, ``cio_timeout`` ...)."""
    where = setting or where_set(exc.setting, app)
    return Problem("configuration_invalid", f"{where} {exc.problem}",
                   f"set {where} to a valid value (docs/configuration.md); the worker logs the same at start",
                   setting=where)


# -- the report ----------------------------------------------------------------------------------


def health_report(
    app: Any,
    settings: Settings | None = None,
    *,
    max_dead_letters: int | None = None,
    max_fallback_depth: int | None = None,
    max_spool_age: float | None = DEFAULT_MAX_SPOOL_AGE,
    ignore: Collection[str] = (),
    check_broker: bool = True,
    check_workers: bool = True,
    inspect_timeout: float = DEFAULT_INSPECT_TIMEOUT,
    workers_cache: float = DEFAULT_WORKERS_CACHE,
    max_ledger_overdue: float | None = None,
) -> HealthReport:
    """Read the shared state, the broker and the workers, and judge them. Never raises.

    ``ignore`` names problems to report under ``ignored`` instead of judging them.
    ``check_broker=False`` skips the broker (and the workers); ``check_workers=False``
    skips the broadcast (a worker checking itself at start). ``max_ledger_overdue``: seconds
    a delivery-ledger entry may stay overdue before ``ledger_overdue`` (default: the ledger's
    grace, four of the sweeper's periods).
    """
    try:
        builder = _Builder(app, settings, inspect_timeout, workers_cache)
        builder.max_ledger_overdue = max_ledger_overdue
        report = builder.build(max_dead_letters, max_fallback_depth, max_spool_age, check_broker, check_workers)
    except Exception as exc:  # noqa: BLE001 - the last net: a health check reports, it never raises
        report = unhealthy(Problem("health_check_failed", f"the health check failed ({type(exc).__name__})",
                                   "report it; the workers' logs may say more"))
    if ignore:
        kept = [p for p in report.problems if p.name not in ignore]
        dropped = [p for p in report.problems if p.name in ignore]
        report = replace(report, problems=kept, ignored=[*report.ignored, *dropped])
    return report


class _Builder:
    """One report's reads; each section catches its own errors and turns them into problems."""

    def __init__(self, app: Any, settings: Settings | None, inspect_timeout: float, workers_cache: float) -> None:
        self.app = app
        self.settings = settings
        self.inspect_timeout = inspect_timeout
        self.workers_cache = workers_cache
        self.problems: list[Problem] = []
        self.out: dict[str, Any] = {}
        self.max_ledger_overdue: float | None = None

    def add(self, name: str, message: str, fix: str, setting: str | None = None) -> None:
        self.problems.append(Problem(name, message, fix, setting))

    def build(
        self, max_dead: int | None, max_fallback: int | None, max_spool_age: float | None,
        check_broker: bool, check_workers: bool,
    ) -> HealthReport:
        s = self._settings()
        if s is not None:
            self._store(s, max_dead, max_fallback)
            self._spool(s, max_spool_age)
        workers: dict[str, dict[str, Any]] | None = None
        if check_broker and self._broker(s) and check_workers:
            workers = self._workers(s)
        self._credentials(s, workers)
        return HealthReport(problems=self.problems, **self.out)

    # -- settings -------------------------------------------------------------------------

    def _settings(self) -> Settings | None:
        if self.settings is not None:
            return self.settings
        try:
            return settings_for_app(self.app)
        except ConfigurationError as exc:
            self.problems.append(configuration_problem(exc, self.app))
        except Exception as exc:  # noqa: BLE001
            self.add("configuration_invalid", f"the settings could not be read ({type(exc).__name__})",
                     "check the CIO_* variables and cio_* Celery settings (docs/configuration.md)")
        return None

    # -- the store ------------------------------------------------------------------------

    def _store(self, s: Settings, max_dead: int | None, max_fallback: int | None) -> None:
        try:
            redis_for(s).ping()
        except ConfigurationError:
            self.add("store_not_configured", "no Redis store is configured and the broker is not Redis",
                     "set CIO_REDIS_URL (or cio_redis_url) to a Redis URL", setting="CIO_REDIS_URL")
            return
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out
            self.add("store_unavailable", f"the store (Redis) does not answer ({type(exc).__name__})",
                     f"start or restore the Redis that {where_set('redis_url', self.app)} names",
                     setting="CIO_REDIS_URL")
            return
        self.out["store_up"] = True
        if s.breaker_enabled:
            self._section("breaker", lambda: self._breaker(s))
        fallback = self._section("fallback", lambda: Fallback(s, self.app).depth())
        dead = self._section("dead_letters", lambda: DeadLetters(s, self.app).count())
        suppressed = self._section("stats", lambda: Claims(s).suppressed())
        self.out.update(fallback_depth=fallback, dead_letters=dead, suppressed_duplicates=suppressed or {})
        self._quarantine(s)
        self._section("ledger", lambda: self._ledger(s))
        self._section("dead_letters", lambda: self._caps(s))
        self.out["batching"] = self._section("batching", lambda: batching_figures(s))
        if max_dead is not None and dead is not None and dead > max_dead:
            self.add("dead_letters_over_threshold", f"{dead} dead letters (more than {max_dead})",
                     "look at them with `celery -A proj cio dead-letters list`, then replay or purge (docs/runbook.md)")
        if max_fallback is not None and fallback is not None and fallback > max_fallback:
            self.add("fallback_over_threshold", f"{fallback} parked operations (more than {max_fallback})",
                     "check that the breaker closes and a worker consumes the fallback queue (docs/runbook.md)")

    def _section(self, name: str, read: Any) -> Any:
        try:
            return read()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.add("store_unavailable", f"the store stopped answering while reading {name.replace('_', ' ')} "
                     f"({type(exc).__name__})", "restore the store's Redis (CIO_REDIS_URL)", setting="CIO_REDIS_URL")
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign data in a key of ours
            self.add(f"{name}_unreadable", f"the store's {name.replace('_', ' ')} data cannot be read "
                     f"({type(exc).__name__})",
                     "inspect the store's keys under the key prefix; `cio breaker reset` rewrites the breaker's")
        return None

    def _breaker(self, s: Settings) -> None:
        status = breaker_for(s).status()
        # Counters of the breaker's hash that its status script does not return (the script
        # above has just made them readable, resetting a damaged state).
        raw: Any = redis_for(s).hmget(key(s, "breaker", status.name), ["trips_total", "corrupt_resets"])
        trips_total, corrupt_resets = (_int(v) for v in raw)
        self.out["breaker"] = {
            "name": status.name,
            "state": status.state,
            "time_left": None if status.time_left < 0 else round(status.time_left, 3),
            "opened_by_hand": status.state == "open" and status.time_left < 0,
            "trips": status.trips,
            "trips_total": trips_total,
            "corrupt_resets": corrupt_resets,
            "consecutive_failures": status.consecutive_failures,
            "probes_in_flight": status.probes_in_flight,
        }
        if status.state == "open":
            if status.time_left < 0:
                self.add("breaker_open", "the circuit breaker was opened by hand: operations are parked, not sent",
                         "close it when ready: `celery -A proj cio breaker close`")
            else:
                self.add("breaker_open", f"the circuit breaker is open ({status.time_left:.0f} s left): Customer.io "
                         "failed too often; operations are parked", "see docs/runbook.md, breaker stuck open")
        elif status.state == "half-open":
            self.add("breaker_half_open", "the circuit breaker is probing Customer.io after an outage",
                     "nothing to do if it closes; see docs/runbook.md")

    def _caps(self, s: Settings) -> None:
        count, used = DeadLetters(s, self.app).usage()
        if count >= SPOOL_NEAR_FULL * s.dead_letter_max or used >= SPOOL_NEAR_FULL * s.dead_letter_max_bytes:
            self.add("dead_letters_near_full",
                     f"dead letters hold {count} of {s.dead_letter_max} entries and {used} of "
                     f"{s.dead_letter_max_bytes} bytes: when full, operations bound for them wait "
                     "(retried every minute)",
                     "look at them with `celery -A proj cio dead-letters list`, replay or purge (docs/runbook.md); "
                     "or raise CIO_DEAD_LETTER_MAX / CIO_DEAD_LETTER_MAX_BYTES", setting="CIO_DEAD_LETTER_MAX_BYTES")
        depth, parked = Fallback(s, self.app).usage()
        if parked >= SPOOL_NEAR_FULL * s.fallback_max_bytes:
            self.add("fallback_near_full",
                     f"{depth} parked operations hold {parked} of {s.fallback_max_bytes} bytes: when full, "
                     "operations the breaker refuses wait in the broker (retried every minute)",
                     "see why the breaker is open (docs/runbook.md); or raise CIO_FALLBACK_MAX_BYTES",
                     setting="CIO_FALLBACK_MAX_BYTES")

    def _quarantine(self, s: Settings) -> None:
        count = self._section("quarantine", lambda: Quarantine(s).count())
        self.out["quarantine"] = count
        if count:
            self.add("quarantine_not_empty", f"{_n(count, 'store entry', 'store entries')} that could not be read "
                     "(parked operations, dead letters or batch items in a form this version cannot read) "
                     f"{'waits' if count == 1 else 'wait'} in the quarantine for a human",
                     "look at them with `celery -A proj cio quarantine list` and `show ID`, "
                     "recover what you need, then `cio quarantine purge` (docs/runbook.md)")

    def _ledger(self, s: Settings) -> None:
        figures = ledger_figures(self.app, s, self.max_ledger_overdue)
        if figures is None:
            return
        late = figures.pop("late")
        self.out["ledger"] = figures
        if late:
            grace, limit, oldest = figures["grace"], figures["max_overdue"], figures["oldest_overdue_seconds"]
            period = max(1.0, grace / 4)  # the sweeper's period (fallback.Releaser)
            self.add("ledger_overdue", f"{_n(late, 'operation', 'operations')} of the delivery ledger "
                     f"{'is' if late == 1 else 'are'} overdue by more than "
                     f"{limit:.0f} s (the oldest by {oldest:.0f} s): no fallback releaser has swept them, so an "
                     "operation lost in transit is not republished",
                     "run at least one worker (-Q cio,cio.send,cio.fallback): "
                     f"its fallback releaser sweeps the ledger every {period:.0f} s; if one runs, look in its log for "
                     "`fallback releaser:` errors (store or broker unreachable); a queue backlog older than the "
                     "grace keeps entries overdue until it drains (docs/runbook.md)")

    # -- this host's spool ----------------------------------------------------------------

    def _spool(self, s: Settings, max_age: float | None) -> None:
        try:
            stats = spool_stats(self.app, s)
        except Exception as exc:  # noqa: BLE001
            self.add("spool_unreadable", f"this host's spool cannot be read ({type(exc).__name__})",
                     "check the permissions and free space of CIO_SPOOL_DIR", setting="CIO_SPOOL_DIR")
            return
        depth, age = stats.depth, stats.oldest_age
        self.out.update(spool_depth=depth, spool_oldest_seconds=None if age is None else round(age, 3),
                        spool_quarantined=stats.quarantined, spool_bytes=stats.bytes, spool_max_bytes=stats.cap)
        if depth and age is not None and max_age is not None and age > max_age:
            self.add("spool_stale", f"{depth} operations wait in this host's spool, the oldest for {age:.0f} s: "
                     "the broker does not take them", "fix the broker problem reported with it; the spool then "
                     "flushes by itself (or run `celery -A proj cio spool flush` on this host)")
        if stats.quarantined:
            n = stats.quarantined
            self.add("spool_quarantine_not_empty", f"{_n(n, 'operation', 'operations')} of this host's spool failed "
                     f"{s.spool_max_attempts} times with the broker answering and {'was' if n == 1 else 'were'} "
                     "quarantined: waiting for an operator",
                     "on this host: `celery -A proj cio spool list`, `spool show ID` for the error, "
                     "then `spool requeue ID` once the cause is fixed, or `spool drop ID` (docs/runbook.md)")
        if stats.cap and stats.bytes >= SPOOL_NEAR_FULL * stats.cap:
            self.add("spool_near_full", f"this host's spool holds {stats.bytes} of {stats.cap} bytes "
                     f"({100 * stats.bytes / stats.cap:.0f} %): when it is full .delay() raises EnqueueError",
                     "fix the broker problem so that it flushes; drop quarantined rows you do not need "
                     "(`cio spool list`); or raise CIO_SPOOL_MAX_BYTES", setting="CIO_SPOOL_MAX_BYTES")

    # -- the broker -----------------------------------------------------------------------

    def _broker(self, s: Settings | None) -> bool:
        """Reachability, a write, and the queues' depths (and consumers where the broker counts them)."""
        try:
            conn = self.app.connection_for_write()
        except ImportError as exc:  # the transport is imported when the URL is parsed
            self.out["broker"] = {"transport": _scheme_of(self.app), "reachable": _url_reachable(self.app),
                                  "publish_ok": False}
            self._transport_missing(exc)
            return False
        except Exception as exc:  # noqa: BLE001
            self.add("broker_publish_failing", f"the broker URL cannot be used ({type(exc).__name__})",
                     "check broker_url (CELERY_BROKER_URL)", setting="broker_url")
            return False
        try:
            scheme = str(conn.transport_cls).split("+")[0].split(":")[0]
            info: dict[str, Any] = {"transport": scheme, "reachable": None, "publish_ok": False}
            self.out["broker"] = info
            address = _address(conn, scheme)
            if address is not None:
                try:
                    socket.create_connection(address, timeout=2.0).close()
                    info["reachable"] = True
                except OSError as exc:
                    info["reachable"] = False
                    self.add("broker_unreachable", f"nothing answers at the broker's address ({type(exc).__name__}); "
                             ".delay() spools operations on this host", "start the broker, or fix broker_url "
                             "(CELERY_BROKER_URL)", setting="broker_url")
                    return False
            try:
                queues = self._probe(conn, scheme, s)
            except ImportError as exc:
                self._transport_missing(exc)
                return False
            except Exception as exc:  # noqa: BLE001 - auth refused, read-only replica, out of memory ...
                self.add("broker_publish_failing", f"the broker answers but refuses this process's writes "
                         f"({type(exc).__name__}); .delay() spools every operation",
                         "check the broker's credentials, memory and role in broker_url (CELERY_BROKER_URL)",
                         setting="broker_url")
                return False
            info["publish_ok"] = True
            self.out["queues"] = queues
            return True
        finally:
            conn.release()

    def _transport_missing(self, exc: ImportError) -> None:
        self.add("broker_publish_failing", f"the broker's transport cannot be loaded ({type(exc).__name__}: {exc}); "
                 "workers die at start and .delay() spools every operation",
                 "pip install 'celery[redis]' for a Redis broker (cio-celery depends on it: reinstall it)",
                 setting="broker_url")

    def _probe(self, conn: Any, scheme: str, s: Settings | None) -> dict[str, dict[str, Any]]:
        names = _queue_names(s)
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=5)
        queues: dict[str, dict[str, Any]] = {}
        channel = conn.default_channel
        client = getattr(channel, "client", None)
        if isinstance(client, redis.Redis):
            # A write as a publish does it (LPUSH), undone at once: a full or read-only Redis refuses it.
            pipe = client.pipeline(transaction=True)
            pipe.lpush(_PROBE_KEY, b"x")
            pipe.delete(_PROBE_KEY)
            pipe.execute()
        for name in names:
            depth, consumers = _declare_passive(conn, name)
            queues[name] = {"depth": depth, "consumers": None if isinstance(client, redis.Redis) else consumers,
                            "workers": []}
        return queues

    # -- the workers ----------------------------------------------------------------------

    def _workers(self, s: Settings | None) -> dict[str, dict[str, Any]] | None:
        try:
            replies = _cached_broadcast(self.app, self.inspect_timeout, self.workers_cache)
        except Exception as exc:  # noqa: BLE001
            self.add("workers_unreadable", f"the workers could not be asked which queues they consume "
                     f"({type(exc).__name__})", "check the broker; `celery -A proj inspect active_queues`")
            return None
        queues = self.out.get("queues") or {}
        for name, q in queues.items():
            q["workers"] = sorted(h for h, r in replies.items() if name in r.get("queues", ()))
            if q["consumers"] is None:
                q["consumers"] = len(q["workers"])
        for name, q in queues.items():
            if not q["consumers"]:
                waiting = q["depth"]
                self.add("queue_not_consumed", f"no worker consumes queue {name!r}"
                         + (f" ({waiting} operations waiting)" if waiting else ""),
                         f"start workers with -Q {','.join(queues)} (celery -A proj worker -Q {','.join(queues)} -E)",
                         setting=_queue_setting(s, name))
        return replies

    # -- credentials ----------------------------------------------------------------------

    def _credentials(self, s: Settings | None, workers: dict[str, dict[str, Any]] | None) -> None:
        queue = s.queue if s is not None else "cio"
        consuming = {h: r for h, r in (workers or {}).items()
                     if queue in r.get("queues", ()) and isinstance(r.get("missing"), list)}
        if consuming:
            gaps: dict[str, list[str]] = {}
            for host, reply in sorted(consuming.items()):
                for var in reply["missing"]:
                    gaps.setdefault(str(var), []).append(host)
            source = "workers"
        elif s is not None:
            gaps = {var: [] for var in credential_gaps(s)}
            source = "this process"
        else:
            return
        track = [v for v in gaps if v != "CIO_APP_API_KEY"]
        self.out["credentials"] = {"track": not track, "app": "CIO_APP_API_KEY" not in gaps, "source": source}
        for family, variables, operations in (
            ("track", track, "Track operations (identify, track ...)"),
            ("app", [v for v in gaps if v == "CIO_APP_API_KEY"], "transactional sends (send_email ...)"),
        ):
            if not variables:
                continue
            hosts = sorted({h for v in variables for h in gaps[v]})
            where = f" on {', '.join(hosts)}" if hosts else " in this process"
            self.add(f"{family}_credentials_missing",
                     f"{' and '.join(variables)} {'is' if len(variables) == 1 else 'are'} not set{where}: {operations} "
                     "are dead-lettered as not_configured",
                     f"set {' and '.join(variables)} where the workers run, then replay them: "
                     "`celery -A proj cio dead-letters replay --reason not_configured --yes`",
                     setting=variables[0])


def ledger_figures(app: Any, s: Settings, max_overdue: float | None = None) -> dict[str, Any] | None:
    """The delivery ledger in one round trip: ``depth`` (operations in flight), ``overdue``
    (past their due time, not yet looked at by the sweeper), ``oldest_overdue_seconds``,
    ``grace``, ``max_overdue`` (``max_overdue`` or the grace) and ``late`` (overdue by more
    than ``max_overdue``). None when the ledger is off (a broker other than Redis, ``CIO_LEDGER=0``).

    Due times are the publishers' clocks plus the grace; they are compared with this host's.
    """
    if not ledger_enabled(s, app):
        return None
    client: Any = redis_for(s)
    due = key(s, "ledger", "due")
    grace = grace_of(s)
    limit = grace if max_overdue is None else max_overdue
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zcard(due)
    pipe.zcount(due, "-inf", now)
    pipe.zcount(due, "-inf", now - limit)
    pipe.zrange(due, 0, 0, withscores=True)
    depth, overdue, late, first = pipe.execute()
    oldest = max(0.0, now - float(first[0][1])) if overdue and first else 0.0
    return {"depth": int(depth), "overdue": int(overdue), "oldest_overdue_seconds": round(oldest, 3),
            "grace": grace, "max_overdue": limit, "late": int(late)}


def _n(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _address(conn: Any, scheme: str) -> tuple[str, int] | None:
    """Host and port to try with a plain TCP connect; None for sockets, memory and unknown transports."""
    default = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672, "librabbitmq": 5672}
    if scheme not in default or not conn.hostname:
        return None
    return str(conn.hostname), int(conn.port or default[scheme])


def _broker_url(app: Any) -> str:
    url = app.conf.broker_write_url or app.conf.broker_url or ""
    return str(url).split(";")[0]


def _scheme_of(app: Any) -> str:
    return _broker_url(app).split("://")[0].split("+")[0] or "amqp"


def _url_reachable(app: Any) -> bool | None:
    """A plain TCP connect to the broker URL's host and port (None: not a TCP URL)."""
    from urllib.parse import urlsplit

    default = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}
    parts = urlsplit(_broker_url(app))
    scheme = parts.scheme.split("+")[0]
    if scheme not in default or not parts.hostname:
        return None
    try:
        socket.create_connection((parts.hostname, parts.port or default[scheme]), timeout=2.0).close()
        return True
    except (OSError, ValueError):
        return False


def _queue_setting(s: Settings | None, name: str) -> str:
    """The variable that names a queue (the first that does, as in ``Settings.queues``)."""
    s = s or Settings()
    for setting in QUEUE_SETTINGS:
        if getattr(s, setting) == name:
            return f"CIO_{setting.upper()}"
    return "CIO_QUEUE"


def _queue_names(s: Settings | None) -> list[str]:
    return (s or Settings()).queues


def _declare_passive(conn: Any, name: str) -> tuple[int, int]:
    """Messages and consumers of a queue; (0, 0) when the broker does not know it (Redis: empty)."""
    from amqp.exceptions import ChannelError, NotFound

    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=name, passive=True)
        return int(ok.message_count), int(ok.consumer_count)
    except (ChannelError, NotFound):
        return 0, 0
    finally:
        try:
            channel.close()
        except Exception:  # noqa: BLE001, S110 - a channel the 404 closed already
            pass


# -- the workers' answers ------------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: dict[int, tuple[float, dict[str, dict[str, Any]]]] = {}


def forget_workers(app: Any = None) -> None:
    """Drop the cached answers of the workers (of ``app``, or all): the next report asks again."""
    with _cache_lock:
        if app is None:
            _cache.clear()
        else:
            _cache.pop(id(app), None)


def _cached_broadcast(app: Any, timeout: float, max_age: float) -> dict[str, dict[str, Any]]:
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(id(app))
    if hit is not None and now - hit[0] < max_age:
        return hit[1]
    replies = ask_workers(app, timeout)
    with _cache_lock:
        _cache[id(app)] = (time.monotonic(), replies)
    return replies


def ask_workers(app: Any, timeout: float = DEFAULT_INSPECT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """``{hostname: {"queues": [...], "missing": [...]}}`` from every worker that answers within ``timeout``.

    Workers answer ``cio_status`` (registered by cio_celery in each worker); one that does
    not know it (another version) is asked for its ``active_queues`` instead.
    """
    out: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for reply in app.control.broadcast(REMOTE_COMMAND, reply=True, timeout=timeout) or []:
        for host, answer in dict(reply).items():
            if isinstance(answer, dict) and "queues" in answer:
                out[str(host)] = answer
            else:
                unknown.append(str(host))
    if unknown:
        active = app.control.inspect(destination=unknown, timeout=timeout).active_queues() or {}
        for host, queues in active.items():
            out[str(host)] = {"queues": [q.get("name") for q in queues or []], "missing": None}
    return out


def problems_named(report: HealthReport, names: Iterable[str]) -> list[Problem]:
    wanted = set(names)
    return [p for p in report.problems if p.name in wanted]


def batching_figures(s: Settings) -> dict[str, Any]:
    """Adaptive batching in one round trip: the buffer's depth and the deliveries by path."""
    pipe = redis_for(s).pipeline(transaction=False)
    pipe.llen(key(s, "coalesce"))
    pipe.hmget(key(s, "stats"), ["batch:requests", "batch:delivered", "delivered:single", "enqueue:appended"])
    depth, (requests, batched, single, appended) = pipe.execute()
    requests, batched, single, appended = (int(v or 0) for v in (requests, batched, single, appended))
    return {"buffer": int(depth), "batch_requests": requests, "batched": batched, "single": single,
            "appended_at_enqueue": appended,
            "batched_share": round(batched / (batched + single), 3) if batched + single else None,
            "per_request": round(batched / requests, 1) if requests else None}
