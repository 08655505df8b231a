"""The one settings object: built once from its sources, frozen, validated at start-up.

Sources, lowest precedence first: defaults, environment variables (``CIO_*``), then an
explicit mapping (the Celery app's ``cio_*`` conf keys, Django's ``CIO_CELERY`` dict or
Flask's ``CIO_CELERY_*`` keys). Nothing else in the package reads configuration.

Importing this module also makes Celery hide the package's URL and id settings wherever it
prints configuration (see :func:`mask_in_celery_reports`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit

from .exceptions import ConfigurationError

__all__ = [
    "CELERY_HIDDEN_KEYS",
    "QUEUE_SETTINGS",
    "SETTINGS",
    "Setting",
    "Settings",
    "build_settings",
    "configure",
    "mask_in_celery_reports",
    "settings_for_app",
]

logger = logging.getLogger("cio_celery")

REGION_HOSTS = {
    "us": ("https://track.customer.io", "https://api.customer.io"),
    "eu": ("https://track-eu.customer.io", "https://api-eu.customer.io"),
}

# Celery's Redis transport default; ETA/countdown messages are redelivered after it.
REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Setting:
    """One documented setting: its field name, environment variable, parser and meaning."""

    name: str
    env: str
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False

    @property
    def default(self) -> Any:
        """The default, read from the ``Settings`` field: it is written in one place only."""
        return Settings.__dataclass_fields__[self.name].default


def _str(v: str) -> str:
    return v


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


SETTINGS: tuple[Setting, ...] = (
    Setting("site_id", "CIO_SITE_ID", _str, "Track API site id (Basic auth user).", secret=True),
    Setting("track_api_key", "CIO_TRACK_API_KEY", _str, "Track API key.", secret=True),
    Setting("app_api_key", "CIO_APP_API_KEY", _str, "App API key (transactional sends).", secret=True),
    Setting("region", "CIO_REGION", _str, "Account region, `us` or `eu`; picks the API hosts."),
    Setting("track_url", "CIO_TRACK_URL", _str,
        "Base URL replacing the region's Track host (`http://127.0.0.1:PORT` for a local fake).",
    ),
    Setting("app_url", "CIO_APP_URL", _str, "Base URL replacing the region's App API host."),
    Setting("redis_url", "CIO_REDIS_URL", _str,
        "Redis for breaker, idempotency, fallback and dead letters; defaults to the broker URL "
        "when the broker is Redis. `django-redis://<alias>` reuses a django-redis cache's connection; "
        "`redis+cluster://host:port` (or `rediss+cluster://`) is a Redis Cluster, any of its masters "
        "(docs/cluster.md).",
    ),
    Setting("key_prefix", "CIO_KEY_PREFIX", _str, "Prefix of every Redis key (used as a hash tag)."),
    Setting("timeout", "CIO_TIMEOUT", float, "HTTP timeout in seconds for one Customer.io request."),
    Setting("queue", "CIO_QUEUE", _str, "Celery queue the operations are sent to (transactional sends aside)."),
    Setting("send_queue", "CIO_SEND_QUEUE", _str,
        "Celery queue the transactional sends (send_email, send_push, send_sms) go to: their own lane, so a "
        "backlog of batchable operations does not delay them; set it to the `queue` value to share one queue.",
    ),
    Setting("fallback_queue", "CIO_FALLBACK_QUEUE", _str,
        "Queue that parked operations are released to after an outage.",
    ),
    Setting("max_retries", "CIO_MAX_RETRIES", int, "Retries of a transient failure before dead letters."),
    Setting("retry_backoff_base", "CIO_RETRY_BACKOFF_BASE", float, "First backoff ceiling in seconds."),
    Setting("retry_backoff_max", "CIO_RETRY_BACKOFF_MAX", float,
        "Cap of the exponential backoff ceiling in seconds (full jitter below it).",
    ),
    Setting("retry_after_max", "CIO_RETRY_AFTER_MAX", float,
        "Longest Retry-After honoured, in seconds; longer ones are cut to this.",
    ),
    Setting("visibility_timeout", "CIO_VISIBILITY_TIMEOUT", float,
        "The broker's visibility timeout; read from `broker_transport_options` when unset. "
        "Every countdown stays below it.",
    ),
    Setting("dead_letter_max", "CIO_DEAD_LETTER_MAX", int,
        "Most dead letters kept; when full, a new one waits (its message is retried every minute, "
        "nothing dropped) until an operator replays or purges some.",
    ),
    Setting("dead_letter_max_bytes", "CIO_DEAD_LETTER_MAX_BYTES", int,
        "Most bytes of dead letters (their JSON); full behaves as `dead_letter_max`.",
    ),
    Setting("fallback_max_bytes", "CIO_FALLBACK_MAX_BYTES", int,
        "Most bytes of operations parked in the fallback store (their JSON); when full, an operation "
        "that would be parked is retried every minute instead, nothing dropped.",
    ),
    Setting("dead_letter_retention", "CIO_DEAD_LETTER_RETENTION", float,
        "Seconds a dead letter is kept: past it, the next add removes it, or a running worker's releaser "
        "within a minute (10,000 a minute at most; a larger backlog takes a minute more a 10,000).",
    ),
    Setting("breaker_enabled", "CIO_BREAKER_ENABLED", _bool, "Guard every call with the shared breaker."),
    Setting("breaker_window", "CIO_BREAKER_WINDOW", float, "Sliding window of the failure rate, seconds."),
    Setting("breaker_minimum_calls", "CIO_BREAKER_MINIMUM_CALLS", int,
        "Calls in the window before the failure rate may trip the breaker.",
    ),
    Setting("breaker_failure_rate", "CIO_BREAKER_FAILURE_RATE", float,
        "Failure rate (0-1] in the window that trips the breaker.",
    ),
    Setting("breaker_consecutive_failures", "CIO_BREAKER_CONSECUTIVE_FAILURES", int,
        "Consecutive transient failures that trip the breaker whatever the rate.",
    ),
    Setting("breaker_slow_call", "CIO_BREAKER_SLOW_CALL", float,
        "A call slower than this many seconds counts as a failure; 0 turns the rule off.",
    ),
    Setting("breaker_open_base", "CIO_BREAKER_OPEN_BASE", float, "First open period, seconds."),
    Setting("breaker_open_max", "CIO_BREAKER_OPEN_MAX", float,
        "Cap of the open period, which doubles on each repeated trip.",
    ),
    Setting("breaker_open_jitter", "CIO_BREAKER_OPEN_JITTER", float,
        "Up to this fraction is added at random to each open period.",
    ),
    Setting("breaker_half_open_probes", "CIO_BREAKER_HALF_OPEN_PROBES", int,
        "Probes allowed at once across the cluster in half-open (K).",
    ),
    Setting("breaker_close_after", "CIO_BREAKER_CLOSE_AFTER", int,
        "Successful probes in a row that close the breaker.",
    ),
    Setting("breaker_probe_lease", "CIO_BREAKER_PROBE_LEASE", float,
        "Seconds a half-open probe permit lives; default: timeout + task_time_limit + 5.",
    ),
    Setting("task_time_limit", "CIO_TASK_TIME_LIMIT", float,
        "Hard time limit of one delivery attempt, seconds (Celery `time_limit` of the tasks).",
    ),
    Setting("breaker_on_store_error", "CIO_BREAKER_ON_STORE_ERROR", _str,
        "When Redis cannot be reached: `retry` later without calling Customer.io, or `allow` the call.",
    ),
    Setting("fallback_release_rate", "CIO_FALLBACK_RELEASE_RATE", float,
        "Parked operations released per second once the breaker is closed.",
    ),
    Setting("fallback_release_interval", "CIO_FALLBACK_RELEASE_INTERVAL", float,
        "Seconds between two runs of the fallback releaser in each worker.",
    ),
    Setting("show_args", "CIO_SHOW_ARGS", _bool,
        "Show operation arguments in Flower and logs (off: customer data stays out).",
    ),
    Setting("idempotency_enabled", "CIO_IDEMPOTENCY_ENABLED", _bool,
        "Claim each operation's idempotency key in Redis before calling Customer.io.",
    ),
    Setting("idempotency_retention", "CIO_IDEMPOTENCY_RETENTION", float,
        "Seconds a delivered operation's caller key (`apply_async(..., idempotency_key=...)`) is kept "
        "(duplicates inside it are suppressed); must outlast the retry horizon plus the visibility timeout.",
    ),
    Setting("idempotency_task_retention", "CIO_IDEMPOTENCY_TASK_RETENTION", float,
        "Seconds a delivered operation enqueued without a caller key (its key is its task id) is kept "
        "marked done, so that redeliveries of it are suppressed; default: the longest redelivery horizon "
        "the other settings allow (docs/idempotency.md); a shorter one is refused. Raise it when queues "
        "can hold a backlog longer than that.",
    ),
    Setting("idempotency_lease", "CIO_IDEMPOTENCY_LEASE", float,
        "Seconds a worker's claim lives while it delivers; default: timeout + task_time_limit + 5.",
    ),
    Setting("ambiguous_sends", "CIO_AMBIGUOUS_SENDS", _str,
        "What a transactional send does after a failure that may have been applied (timeout after "
        "sending, 5xx): `dead_letter` (for review) or `retry`; per operation as "
        "`send_email=retry,send_sms=dead_letter`.",
    ),
    Setting("enqueue_timeout", "CIO_ENQUEUE_TIMEOUT", float,
        "Longest time `.delay()` waits for the broker before spooling the operation, seconds.",
    ),
    Setting("on_broker_error", "CIO_ON_BROKER_ERROR", _str,
        "When the broker cannot take an operation at enqueue: `spool` it locally (nothing raised) "
        "or `raise` EnqueueError.",
    ),
    Setting("spool_dir", "CIO_SPOOL_DIR", _str,
        "Directory of the local spool (SQLite); default: `$XDG_STATE_HOME/cio_celery` or "
        "`~/.local/state/cio_celery`.",
    ),
    Setting("spool_flush_interval", "CIO_SPOOL_FLUSH_INTERVAL", float,
        "Seconds between two attempts to flush the spool to the broker.",
    ),
    Setting("spool_max_bytes", "CIO_SPOOL_MAX_BYTES", int,
        "Most bytes of messages (their JSON) the spool holds, quarantined rows included; when it is "
        "full `.delay()` raises `EnqueueError` (nothing is dropped).",
    ),
    Setting("spool_max_attempts", "CIO_SPOOL_MAX_ATTEMPTS", int,
        "Failed flushes of one row, with the broker answering, before the row is moved to the "
        "spool's quarantine and the rows behind it flow on.",
    ),
    Setting("ledger", "CIO_LEDGER", _bool,
        "Record every publish in the delivery ledger when the broker is Redis, so that a message "
        "the transport loses in transit (a Redis restart between BRPOP and its unacked record) is "
        "republished; costs one store round trip per `.delay()`.",
    ),
    Setting("batch_drain", "CIO_BATCH_DRAIN", _bool,
        "Release parked Track-API operations after an outage as `/api/v2/batch` requests "
        "(up to 500 KB each) instead of one request per operation.",
    ),
    Setting("batch_coalesce", "CIO_BATCH_COALESCE", _bool,
        "Adaptive batching: when batchable Track-API operations arrive faster than the rate limit "
        "lets single requests go, they wait in a buffer and leave as `/api/v2/batch` requests; "
        "below the limit each goes alone.",
    ),
    Setting("batch_at_enqueue", "CIO_BATCH_AT_ENQUEUE", _bool,
        "With adaptive batching, past the rate limit `.delay()` of a batchable operation appends it "
        "to the batching buffer in the store (one round trip, given up after 0.1 s) instead of "
        "publishing one Celery message per operation, while a worker's drainer runs; below the "
        "limit, with options, or when the store does not answer, it publishes as usual.",
    ),
    Setting("batch_linger", "CIO_BATCH_LINGER", float,
        "Longest an operation waits in the batching buffer before its batch leaves, seconds.",
    ),
    Setting("batch_min_size", "CIO_BATCH_MIN_SIZE", int,
        "Operations in the buffer that make a batch leave at once, before the linger ends.",
    ),
    Setting("batch_max_operations", "CIO_BATCH_MAX_OPERATIONS", int,
        "Most operations in one batch request.",
    ),
    Setting("batch_max_in_flight", "CIO_BATCH_MAX_IN_FLIGHT", int,
        "Most batches of the batching buffer being delivered at once, cluster-wide (the rest of the "
        "worker processes stay free for sends and single operations; batches grow meanwhile); 0: no cap.",
    ),
    Setting("batch_buffer_max_bytes", "CIO_BATCH_BUFFER_MAX_BYTES", int,
        "Most bytes the batching buffer holds in the store (64 MiB; besides at most 100,000 operations); "
        "past either, operations go alone (one request each), as when no drainer runs. An operation over "
        "32,000 bytes always goes alone.",
    ),
    Setting("rate_limit_track", "CIO_RATE_LIMIT_TRACK", float,
        "Most Track API requests per second for the whole cluster (Customer.io documents 100); 0: no limit.",
    ),
    Setting("rate_limit_transactional", "CIO_RATE_LIMIT_TRANSACTIONAL", float,
        "Most transactional (App API `/v1/send/*`) requests per second for the whole cluster "
        "(Customer.io documents 100); 0: no limit.",
    ),
    Setting("rate_limit_headroom", "CIO_RATE_LIMIT_HEADROOM", float,
        "Fraction of each limit left unused, so network jitter cannot push a 1 s window at "
        "Customer.io over it.",
    ),
    Setting("rate_limit_burst", "CIO_RATE_LIMIT_BURST", int,
        "Requests that may start at once when the limiter has been idle (1: evenly spaced).",
    ),
    Setting("rate_limit_max_sleep", "CIO_RATE_LIMIT_MAX_SLEEP", float,
        "Longest wait for a rate-limit slot spent sleeping in the worker; longer waits reschedule "
        "the task (no retry attempt spent, no worker process held).",
    ),
)

SEND_OPERATIONS = ("send_email", "send_push", "send_sms", "send_whatsapp", "send_inbox_message", "send_in_app")
AMBIGUOUS_POLICIES = ("dead_letter", "retry")

_BY_NAME = {s.name: s for s in SETTINGS}


#: The settings that name a queue a worker consumes, in ``-Q`` order (``Settings.queues``).
QUEUE_SETTINGS: Final = ("queue", "send_queue", "fallback_queue")


@dataclass(frozen=True)
class Settings:
    """Validated configuration of cio_celery; build it with :func:`build_settings`."""

    site_id: str | None = dataclasses.field(default=None, repr=False)
    track_api_key: str | None = dataclasses.field(default=None, repr=False)
    app_api_key: str | None = dataclasses.field(default=None, repr=False)
    region: str = "us"
    track_url: str | None = None
    app_url: str | None = None
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    key_prefix: str = "cio"
    timeout: float = 10.0
    queue: str = "cio"
    send_queue: str = "cio.send"
    fallback_queue: str = "cio.fallback"
    max_retries: int = 8
    retry_backoff_base: float = 2.0
    retry_backoff_max: float = 600.0
    retry_after_max: float = 900.0
    visibility_timeout: float | None = None
    dead_letter_max: int = 100_000
    dead_letter_max_bytes: int = 512 * 1024 * 1024
    fallback_max_bytes: int = 1024 * 1024 * 1024
    dead_letter_retention: float = 30 * 86400.0
    breaker_enabled: bool = True
    breaker_window: float = 30.0
    breaker_minimum_calls: int = 20
    breaker_failure_rate: float = 0.5
    breaker_consecutive_failures: int = 10
    breaker_slow_call: float = 0.0
    breaker_open_base: float = 10.0
    breaker_open_max: float = 300.0
    breaker_open_jitter: float = 0.2
    breaker_half_open_probes: int = 2
    breaker_close_after: int = 3
    breaker_probe_lease: float | None = None
    task_time_limit: float = 60.0
    breaker_on_store_error: str = "retry"
    fallback_release_rate: float = 50.0
    fallback_release_interval: float = 1.0
    show_args: bool = False
    idempotency_enabled: bool = True
    idempotency_retention: float = 7 * 86400.0
    idempotency_task_retention: float | None = None
    idempotency_lease: float | None = None
    ambiguous_sends: str = "dead_letter"
    enqueue_timeout: float = 0.5
    on_broker_error: str = "spool"
    spool_dir: str | None = None
    spool_flush_interval: float = 1.0
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_max_attempts: int = 5
    ledger: bool = True
    batch_drain: bool = True
    batch_coalesce: bool = True
    batch_at_enqueue: bool = True
    batch_linger: float = 0.1
    batch_min_size: int = 20
    batch_max_operations: int = 1000
    batch_max_in_flight: int = 2
    batch_buffer_max_bytes: int = 64 * 1024 * 1024
    rate_limit_track: float = 100.0
    rate_limit_transactional: float = 100.0
    rate_limit_headroom: float = 0.05
    rate_limit_burst: int = 1
    rate_limit_max_sleep: float = 0.05

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def track_base_url(self) -> str:
        return (self.track_url or REGION_HOSTS[self.region][0]).rstrip("/")

    @property
    def app_base_url(self) -> str:
        return (self.app_url or REGION_HOSTS[self.region][1]).rstrip("/")

    @property
    def queues(self) -> list[str]:
        """The queues a worker must consume, in ``-Q`` order: operations, sends, released parked ones."""
        return list(dict.fromkeys(getattr(self, name) for name in QUEUE_SETTINGS))

    def queue_for(self, operation: str) -> str:
        """Where an operation is published when no ``task_routes`` say otherwise."""
        from .limiter import bucket_of

        return self.send_queue if bucket_of(operation) == "transactional" else self.queue

    @property
    def max_countdown(self) -> float:
        """Longest countdown the package schedules: a margin below the visibility timeout.

        Celery's Redis transport holds ETA messages in worker memory and redelivers them
        when the visibility timeout passes, so a longer countdown runs the task twice.
        """
        vt = self.visibility_timeout or REDIS_DEFAULT_VISIBILITY_TIMEOUT
        return max(1.0, min(vt * 0.9, vt - 60.0))

    @property
    def probe_lease(self) -> float:
        """A half-open permit outlives the HTTP timeout plus the task's time limit."""
        if self.breaker_probe_lease is not None:
            return self.breaker_probe_lease
        return self.timeout + self.task_time_limit + 5.0

    @property
    def claim_lease(self) -> float:
        """A worker's idempotency claim outlives one attempt: HTTP timeout plus the time limit."""
        if self.idempotency_lease is not None:
            return self.idempotency_lease
        return self.timeout + self.task_time_limit + 5.0

    @property
    def retry_horizon(self) -> float:
        """Longest time from an operation's first attempt to its last redelivery.

        Every countdown, each attempt's time limit, and one visibility timeout for a message
        whose worker died after delivering it.
        """
        vt = self.visibility_timeout or REDIS_DEFAULT_VISIBILITY_TIMEOUT
        longest_wait = min(max(self.retry_backoff_max, self.retry_after_max * 1.1), self.max_countdown)
        return self.max_retries * longest_wait + (self.max_retries + 1) * self.task_time_limit + vt

    @property
    def ledger_grace(self) -> float:
        """How long a delivery ledger entry may go unseen before the sweeper looks for it: the
        visibility timeout (after which kombu itself restores an unacknowledged message), at
        most 5 minutes."""
        return max(5.0, min(self.visibility_timeout or REDIS_DEFAULT_VISIBILITY_TIMEOUT, 300.0))

    @property
    def redelivery_horizon(self) -> float:
        """Longest time after an operation is marked done that another copy of its message (the
        same task id) can still ask for its claim.

        The retry horizon (every countdown and time limit of a retry chain, and one visibility
        timeout), plus a countdown the copy was given before the operation was done, a claim
        lease it waited for, the delivery ledger's republish (its grace and a quarter more, the
        sweep interval), a fallback release interval and a minute for kombu's restore sweep.
        """
        return (self.retry_horizon + self.max_countdown + self.claim_lease + 1.0
                + 1.25 * self.ledger_grace + self.fallback_release_interval + 60.0)

    @property
    def task_key_retention(self) -> float:
        """Seconds a done mark keyed by a task id is kept (``idempotency_task_retention``, by
        default the redelivery horizon)."""
        if self.idempotency_task_retention is not None:
            return self.idempotency_task_retention
        return self.redelivery_horizon

    @property
    def caller_key_retention(self) -> float:
        """Seconds a done mark keyed by a caller key is kept: ``idempotency_retention``, and never
        less than a task id's (its message's own redeliveries)."""
        return max(self.idempotency_retention, self.task_key_retention)

    @property
    def store_is_cluster(self) -> bool:
        """The store is a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
        return (self.redis_url or "").split(":", 1)[0] in {"redis+cluster", "rediss+cluster"}

    def ambiguous_policy(self, operation: str) -> str:
        """``retry`` or ``dead_letter`` for a transactional send whose failure may have been applied."""
        return _ambiguous_map(self.ambiguous_sends).get(operation, "retry")

    @property
    def spool_path(self) -> str:
        if self.spool_dir:
            return os.path.expanduser(self.spool_dir)
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return os.path.join(state, "cio_celery")

    def with_changes(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _ambiguous_map(spec: str) -> dict[str, str]:
    """Parse ``dead_letter`` / ``retry`` / ``send_email=retry,send_sms=dead_letter``."""
    text = spec.strip()
    if text in AMBIGUOUS_POLICIES:
        return dict.fromkeys(SEND_OPERATIONS, text)
    out = dict.fromkeys(SEND_OPERATIONS, "dead_letter")
    for part in text.split(","):
        name, sep, policy = (x.strip() for x in part.partition("="))
        if not sep or name not in SEND_OPERATIONS or policy not in AMBIGUOUS_POLICIES:
            raise ConfigurationError(
                "ambiguous_sends",
                f"must be {' or '.join(AMBIGUOUS_POLICIES)}, or a list such as send_email=retry "
                f"(operations: {', '.join(SEND_OPERATIONS)})",
            )
        out[name] = policy
    return out


def _split_url(name: str, url: Any) -> SplitResult:
    """``urlsplit`` with its port parsed, every failure a ConfigurationError naming the setting.

    The messages never hold the URL: it may carry a password.
    """
    if not isinstance(url, str):
        raise ConfigurationError(name, f"must be a URL string, not {type(url).__name__}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigurationError(name, "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced [IPv6] bracket, for one
        raise ConfigurationError(name, "is not a valid URL") from None
    try:
        parts.port  # noqa: B018 - read for its ValueError
    except ValueError:  # not a number, or out of range
        raise ConfigurationError(name, "has an invalid port") from None
    return parts


def _validate_redis_url(url: str) -> None:
    parts = _split_url("redis_url", url)
    if parts.scheme not in {"redis", "rediss", "unix", "django-redis", "redis+cluster", "rediss+cluster"}:
        raise ConfigurationError(
            "redis_url", "must be a redis://, rediss:// or unix:// URL, django-redis://<cache alias>, "
            "or redis+cluster://host:port for a Redis Cluster"
        )
    if parts.scheme.endswith("+cluster"):
        if not parts.hostname:
            raise ConfigurationError("redis_url", "must name a cluster node: redis+cluster://host:port")
        if parts.path.strip("/") not in {"", "0"}:
            raise ConfigurationError("redis_url", "names a Redis Cluster, which has database 0 only")
        return
    if parts.scheme == "django-redis":
        if not parts.netloc:
            raise ConfigurationError("redis_url", "must name a cache alias: django-redis://<alias>")
        return
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigurationError("redis_url", "must name a socket path: unix:///path/to/redis.sock")
        return
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigurationError("redis_url", "must end with a database number (/0, /1 ...) or nothing")


def _validate(s: Settings) -> None:
    if s.region not in REGION_HOSTS:
        raise ConfigurationError("region", f"must be one of {sorted(REGION_HOSTS)}")
    for name in ("track_url", "app_url"):
        url = getattr(s, name)
        if url is not None:
            parts = _split_url(name, url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ConfigurationError(name, "must be an http(s) base URL such as https://host[:port]")
            if parts.query or parts.fragment:
                raise ConfigurationError(name, "must not contain a query or fragment")
            if parts.username is not None or parts.password is not None:
                raise ConfigurationError(name, "must not contain credentials (user:password@); "
                                         "the API keys are settings of their own")
    if s.redis_url is not None:
        _validate_redis_url(s.redis_url)
    if not s.key_prefix or any(c in s.key_prefix for c in "{} "):
        raise ConfigurationError("key_prefix", "must be non-empty without braces or spaces")
    for name in ("timeout", "retry_backoff_base", "retry_backoff_max", "retry_after_max",
                 "dead_letter_retention"):
        if not getattr(s, name) > 0:
            raise ConfigurationError(name, "must be greater than 0")
    if s.retry_backoff_max < s.retry_backoff_base:
        raise ConfigurationError("retry_backoff_max", "must be at least retry_backoff_base")
    if s.max_retries < 0:
        raise ConfigurationError("max_retries", "must be 0 or more")
    if s.dead_letter_max < 1:
        raise ConfigurationError("dead_letter_max", "must be at least 1")
    for name in ("dead_letter_max_bytes", "fallback_max_bytes", "batch_buffer_max_bytes"):
        if getattr(s, name) < 64 * 1024:
            raise ConfigurationError(name, "must be at least 65536 bytes")
    if s.visibility_timeout is not None and s.visibility_timeout < 2:
        raise ConfigurationError("visibility_timeout", "must be at least 2 seconds")
    for name in ("breaker_window", "breaker_open_base", "breaker_open_max", "task_time_limit",
                 "fallback_release_rate", "fallback_release_interval"):
        if not getattr(s, name) > 0:
            raise ConfigurationError(name, "must be greater than 0")
    if not 0 < s.breaker_failure_rate <= 1:
        raise ConfigurationError("breaker_failure_rate", "must be in (0, 1]")
    for name in ("breaker_minimum_calls", "breaker_consecutive_failures", "breaker_half_open_probes",
                 "breaker_close_after"):
        if getattr(s, name) < 1:
            raise ConfigurationError(name, "must be at least 1")
    if s.breaker_slow_call < 0 or not 0 <= s.breaker_open_jitter <= 1:
        raise ConfigurationError("breaker_slow_call" if s.breaker_slow_call < 0 else "breaker_open_jitter",
                                 "is out of range")
    if s.breaker_open_max < s.breaker_open_base:
        raise ConfigurationError("breaker_open_max", "must be at least breaker_open_base")
    if s.breaker_probe_lease is not None and s.breaker_probe_lease <= s.timeout:
        raise ConfigurationError("breaker_probe_lease", "must exceed timeout (plus the task time limit)")
    for name in ("rate_limit_track", "rate_limit_transactional", "rate_limit_max_sleep"):
        if getattr(s, name) < 0:
            raise ConfigurationError(name, "must be 0 or more")
    if not 0 <= s.rate_limit_headroom < 1:
        raise ConfigurationError("rate_limit_headroom", "must be in [0, 1)")
    if s.batch_max_operations < 1:
        raise ConfigurationError("batch_max_operations", "must be at least 1")
    if s.batch_max_in_flight < 0:
        raise ConfigurationError("batch_max_in_flight", "must be 0 (no cap) or more")
    if not 0 < s.batch_linger <= 60:
        raise ConfigurationError("batch_linger", "must be in (0, 60] seconds")
    if not 1 <= s.batch_min_size <= s.batch_max_operations:
        raise ConfigurationError("batch_min_size", "must be between 1 and batch_max_operations")
    if s.rate_limit_burst < 1:
        raise ConfigurationError("rate_limit_burst", "must be at least 1")
    if s.breaker_on_store_error not in {"retry", "allow"}:
        raise ConfigurationError("breaker_on_store_error", "must be 'retry' or 'allow'")
    if not s.queue or not s.fallback_queue or s.queue == s.fallback_queue:
        raise ConfigurationError("fallback_queue", "must be non-empty and differ from queue")
    if not s.send_queue or s.send_queue == s.fallback_queue:
        raise ConfigurationError("send_queue", "must be non-empty and differ from fallback_queue")
    _ambiguous_map(s.ambiguous_sends)
    for name in ("enqueue_timeout", "spool_flush_interval"):
        if not getattr(s, name) > 0:
            raise ConfigurationError(name, "must be greater than 0")
    if s.spool_max_bytes < 1024 * 1024:
        raise ConfigurationError("spool_max_bytes", "must be at least 1048576 (1 MiB)")
    if s.spool_max_attempts < 1:
        raise ConfigurationError("spool_max_attempts", "must be at least 1")
    if s.on_broker_error not in {"spool", "raise"}:
        raise ConfigurationError("on_broker_error", "must be 'spool' or 'raise'")
    if s.idempotency_lease is not None and s.idempotency_lease <= min(s.timeout, s.task_time_limit):
        # An attempt ends with its HTTP timeout or its hard time limit, whichever comes first.
        raise ConfigurationError("idempotency_lease", "must exceed the shorter of timeout and task_time_limit")
    if (s.idempotency_enabled and s.idempotency_task_retention is not None
            and s.idempotency_task_retention < s.redelivery_horizon):
        raise ConfigurationError(
            "idempotency_task_retention",
            f"must be at least {s.redelivery_horizon:.0f} s: the redelivery horizon (the retry horizon, a "
            "countdown, a claim lease, the delivery ledger's grace); a shorter one lets a late redelivery "
            "through twice",
        )
    if s.idempotency_enabled and s.idempotency_retention < s.retry_horizon:
        raise ConfigurationError(
            "idempotency_retention",
            f"must be at least {s.retry_horizon:.0f} s: the retry horizon (max_retries x the longest "
            "countdown, each attempt's time limit, one visibility timeout); a shorter one lets a late "
            "redelivery through twice",
        )


def build_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "settings",
) -> Settings:
    """Build settings from the environment, then ``overrides`` (keys are field names)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        raw = env.get(spec.env)
        if raw is not None and raw != "":
            try:
                values[spec.name] = spec.parse(raw)
            except ValueError as exc:
                raise ConfigurationError(spec.env, f"cannot be parsed ({exc.__class__.__name__})") from None
    for key, value in (overrides or {}).items():
        if key not in _BY_NAME:
            raise ConfigurationError(f"{source}.{key}", "is not a cio_celery setting")
        if value is None:
            continue
        spec = _BY_NAME[key]
        if isinstance(value, str) and spec.parse is not _str:
            try:
                value = spec.parse(value)
            except ValueError:
                raise ConfigurationError(f"{source}.{key}", "cannot be parsed") from None
        values[key] = value
    return Settings(**values)


def _celery_overrides(conf: Any) -> tuple[dict[str, Any], str | None]:
    """The ``cio_*`` keys of a Celery conf, and the broker URL when the broker is Redis."""
    out: dict[str, Any] = {}
    for spec in SETTINGS:
        value = conf.get(f"cio_{spec.name}")
        if value is not None:
            out[spec.name] = value
    broker_url = conf.get("broker_url") or ""
    broker_redis = None
    if isinstance(broker_url, str) and broker_url.split(":", 1)[0] in {"redis", "rediss", "unix"}:
        broker_redis = broker_url.split(";")[0]
    if "visibility_timeout" not in out:
        opts = conf.get("broker_transport_options") or {}
        vt = opts.get("visibility_timeout")
        if vt is not None:
            out["visibility_timeout"] = float(vt)
    return out, broker_redis


def _build_for_app(app: Any, overrides: Mapping[str, Any], source: str) -> Settings:
    base, broker_redis = _celery_overrides(app.conf)
    base.update(overrides)
    settings = build_settings(base, source=source)
    if settings.redis_url is None and broker_redis is not None:
        try:
            settings = settings.with_changes(redis_url=broker_redis)
        except ConfigurationError as exc:
            raise ConfigurationError("broker_url (the default redis_url)", exc.problem) from None
    return settings


_APP_ATTR = "_cio_celery_settings"


def settings_for_app(app: Any) -> Settings:
    """The app's settings, built on first use from the environment and ``app.conf``."""
    cached = app.__dict__.get(_APP_ATTR)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    settings = _build_for_app(app, {}, source="celery conf cio")
    app.__dict__[_APP_ATTR] = settings
    return settings


def configure(app: Any, settings: Settings | None = None, **overrides: Any) -> Settings:
    """Set the app's settings explicitly (Django/Flask integrations and tests use this)."""
    if settings is None:
        settings = _build_for_app(app, overrides, source="settings")
    app.__dict__[_APP_ATTR] = settings
    return settings


# -- Celery's configuration printouts ---------------------------------------------------------

CELERY_HIDDEN_KEYS: Final = r"(?:^|_)cio_(?:redis_url|track_url|app_url|site_id|spool_dir)$"
"""Celery conf keys of this package that Celery's printouts must hide (case-insensitive).

The API keys (``cio_track_api_key``, ``cio_app_api_key``) already match Celery's own
pattern (``KEY``); the store URL, which holds the Redis password, did not.
"""


def mask_in_celery_reports() -> bool:
    """Make ``celery report``, ``inspect conf`` and Flower hide the package's URLs and ids.

    Celery masks a conf key when it matches ``celery.app.utils.HIDDEN_SETTINGS``
    (``API|TOKEN|KEY|SECRET|PASS|...``), and masks ``broker_url`` and ``*backend*`` keys
    specially (``filter_hidden_settings``); ``cio_redis_url`` matched none of them. The
    pattern is read at each call, so extending it here covers every printout: ``celery
    report`` (``bugreport`` -> ``conf.humanize``), ``inspect conf`` (the worker's ``conf``
    control command -> ``conf.table``) and Flower (which asks the workers the same way).
    The ``celery`` command imports this module through the ``cio`` sub-command's entry
    point, and workers import it with the tasks. Idempotent; False if Celery has changed
    and the pattern could not be extended (``cio_celery.checks`` can report it).
    """
    try:
        from celery.app import utils as celery_utils
    except ImportError:  # pragma: no cover - celery is a dependency
        return False
    pattern = getattr(celery_utils, "HIDDEN_SETTINGS", None)
    if not isinstance(pattern, re.Pattern) or not callable(getattr(celery_utils, "filter_hidden_settings", None)):
        logger.warning("cio_celery: Celery's HIDDEN_SETTINGS is missing; cio_redis_url may be shown unmasked")
        return False
    if CELERY_HIDDEN_KEYS not in pattern.pattern:
        celery_utils.HIDDEN_SETTINGS = re.compile(f"{pattern.pattern}|{CELERY_HIDDEN_KEYS}", pattern.flags | re.I)
    return True


mask_in_celery_reports()
