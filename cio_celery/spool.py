"""A local durable spool for operations the broker could not take at enqueue.

``.delay()`` must never crash the calling app because the broker is down, and must never
lose the operation. :class:`SpoolingPublisher` publishes on a small thread pool and waits
at most ``enqueue_timeout``; on a broker outage or a timeout it writes the message to a
SQLite file (WAL, ``synchronous=FULL``, mode 0600 in a 0700 directory) and a background
thread flushes it to the broker, oldest first, once the broker answers again. While
entries wait in the spool, new operations of the same process queue behind them, so a
process's order is kept.

Only a broker outage is spooled. A publish that fails for the caller's or the
environment's fault (a bad option such as ``expires="soon"``, an unknown serializer or
compression, an ``ImportError`` inside kombu, a message that cannot be encoded) raises at
the call, naming the option or module, and nothing is spooled: such a message would fail
the flusher for ever and every later operation would queue behind it. Errors are told
apart by their type and by building the message locally (:func:`check_entry`), never by
their text.

The spool never blocks on one row: a row that fails to publish while the broker answers
(the flusher probes it) is tried again on later passes, and after ``spool_max_attempts``
failures it moves to the *quarantine* table of the same file, where an operator can see it,
requeue it or drop it (:func:`list_rows`, :func:`show_row`, :func:`requeue_row`,
:func:`drop_row`). The rows behind it flow past it meanwhile.

The spool belongs to one app and one broker: its file is named after the app's main name
and a hash of the broker URL without its password (:func:`spool_file`), and the file
records its owner, so app B never flushes app A's rows into B's broker.

Its size is capped (``spool_max_bytes``, the JSON of the messages, quarantine included):
when it is full ``.delay()`` raises :class:`~cio_celery.exceptions.EnqueueError` rather
than drop anything. :func:`spool_usage` tells how close it is.

A publish that timed out may still reach the broker later. Its row is *held* while that
publish is in flight: deleted if it succeeds, released to the flusher if it fails. A
process that dies with a publish in flight leaves a hold that expires after
``HOLD_SECONDS``; if that publish had in fact landed, the message is published twice with
the same task id, and the idempotency claim delivers it once.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import queue
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from celery import Task
from kombu import compression as kombu_compression
from kombu import serialization as kombu_serialization
from kombu.exceptions import EncodeError, OperationalError, SerializerNotInstalled

from ._process import PerProcess
from .exceptions import ConfigurationError, EnqueueError, ValidationError
from .settings import Settings, settings_for_app

__all__ = [
    "BadOption",
    "FlushResult",
    "Spool",
    "SpoolRow",
    "SpoolRowInfo",
    "SpoolStats",
    "SpoolUsage",
    "SpoolingPublisher",
    "check_entry",
    "check_options",
    "drop_row",
    "flush_spool",
    "held_depth",
    "is_broker_outage",
    "list_rows",
    "publisher_for",
    "quarantine_depth",
    "requeue_row",
    "show_row",
    "spool_depth",
    "spool_file",
    "spool_for",
    "spool_stats",
    "spool_usage",
    "storable_options",
]

logger = logging.getLogger("cio_celery.spool")

# Longest a row stays held for a publish that is still in flight in some process.
HOLD_SECONDS = 60.0
# How often a publisher with an open gate looks for rows another process left behind.
LEFTOVER_CHECK_SECONDS = 30.0

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS spool (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created REAL NOT NULL,
        hold_until REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        size INTEGER NOT NULL,
        entry TEXT NOT NULL
    )""",
    # Same ids as the spool table (AUTOINCREMENT never reuses one), so an id names one row.
    """CREATE TABLE IF NOT EXISTS quarantine (
        id INTEGER PRIMARY KEY,
        created REAL NOT NULL,
        quarantined REAL NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT,
        size INTEGER NOT NULL,
        entry TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Bytes held, kept by triggers so that the cap check is one read in every process.
    "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO usage (id, bytes) VALUES (1, 0)",
    """CREATE TRIGGER IF NOT EXISTS spool_add AFTER INSERT ON spool
        BEGIN UPDATE usage SET bytes = bytes + NEW.size WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS spool_del AFTER DELETE ON spool
        BEGIN UPDATE usage SET bytes = bytes - OLD.size WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS quarantine_add AFTER INSERT ON quarantine
        BEGIN UPDATE usage SET bytes = bytes + NEW.size WHERE id = 1; END""",
    """CREATE TRIGGER IF NOT EXISTS quarantine_del AFTER DELETE ON quarantine
        BEGIN UPDATE usage SET bytes = bytes - OLD.size WHERE id = 1; END""",
)

# Options Celery's send_task understands that are stored with a spooled message. countdown
# and a relative expires become absolute times when the operation is spooled.
_PASSTHROUGH = frozenset({
    "queue", "routing_key", "exchange", "priority", "eta", "expires", "time_limit",
    "soft_time_limit", "argsrepr", "kwargsrepr", "headers", "shadow", "parent_id", "root_id",
    "serializer", "compression", "ignore_result", "link", "link_error", "group_id",
})
_SAFE_NAME: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_URL_PASSWORD: Final = re.compile(r"(//[^/@:;]*):[^/@;]*@")


# -- what a spool row is ----------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolRow:
    id: int
    created: float
    hold_until: float
    entry: dict[str, Any]
    attempts: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class SpoolRowInfo:
    """One row as an operator sees it: no customer data."""

    id: int
    operation: str
    task_id: str | None
    age: float
    attempts: int
    state: str  # "pending", "held" (a publish may still land) or "quarantined"
    last_error: str | None  # an exception type, never its text
    size: int  # bytes of the message's JSON

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "operation": self.operation, "task_id": self.task_id, "age": round(self.age, 3),
            "attempts": self.attempts, "state": self.state, "last_error": self.last_error, "size": self.size,
        }


@dataclass(frozen=True)
class FlushResult:
    published: int
    remaining: int
    quarantined: int = 0


class SpoolUsage(NamedTuple):
    """Bytes held by the spool (pending and quarantined messages) and the cap."""

    bytes: int
    cap: int


@dataclass(frozen=True)
class SpoolStats:
    """What health and metrics read: pending rows, oldest pending age, quarantine, usage.

    Of the pending rows, ``held`` are held by a publish still in flight (``hold_left``: seconds
    until the last hold ends, None when none is held) and ``failing`` failed to publish with
    the broker answering (their attempts count towards ``spool_max_attempts``).
    """

    depth: int
    oldest_age: float | None
    quarantined: int
    bytes: int
    cap: int
    held: int = 0
    hold_left: float | None = None
    failing: int = 0


# -- file ownership and permissions ------------------------------------------------------------


def _owner_of(app: Any) -> str:
    """``main|broker URL without password``: the app and broker a spool belongs to."""
    conf = app.conf
    urls = conf.get("broker_write_url") or conf.get("broker_url") or "amqp://guest@localhost//"
    if isinstance(urls, (list, tuple)):
        urls = ";".join(str(u) for u in urls)
    without_password = _URL_PASSWORD.sub(r"\1@", str(urls))
    return f"{app.main or 'celery'}|{without_password}"


def spool_file(app: Any, settings: Settings | None = None) -> str:
    """The spool file of ``app`` and its broker on this host (it may not exist yet).

    ``<spool_dir>/<app main>-<16 hex of sha256(main, broker URL without password)>.db``:
    two apps on one host, or one app pointed at another broker, never share a spool, and
    the file name holds no password.
    """
    s = settings or settings_for_app(app)
    owner = _owner_of(app)
    main = _SAFE_NAME.sub("_", str(app.main or "celery"))[:40].strip("._") or "celery"
    digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return os.path.join(s.spool_path, f"{main}-{digest}.db")


def _private_dir(path: str) -> None:
    """Create ``path`` 0700, or make an existing one 0700; refuse one we must not change."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if stat.S_IMODE(info.st_mode) & 0o077:
        if info.st_uid != os.geteuid() or info.st_mode & stat.S_ISVTX:
            raise ConfigurationError(
                "spool_dir", "is open to other users and cannot be made private (another user's directory, "
                "or a shared one such as /tmp): give the spool a directory of its own",
            )
        os.chmod(path, 0o700)


def _private_file(path: str) -> None:
    """Make an existing file 0600; refuse a symlink or another user's file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise ConfigurationError("spool_dir", f"holds {os.path.basename(path)}, which is not a regular file")
    if stat.S_IMODE(info.st_mode) != 0o600:
        if info.st_uid != os.geteuid():
            raise ConfigurationError("spool_dir", f"holds {os.path.basename(path)}, owned by another user")
        os.chmod(path, 0o600)


def _create_private(path: str) -> None:
    _private_file(path)  # an existing symlink or foreign file is refused before it is opened
    fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.close(fd)
    _private_file(path)


# -- the SQLite file ---------------------------------------------------------------------------


class Spool:
    """One spool file: ``<name>.db`` in ``directory`` (0700), rows of messages (0600).

    ``owner`` is recorded in the file the first time and checked every time: a file of
    another app or broker is refused (:class:`ConfigurationError` naming ``spool_dir``).
    """

    def __init__(
        self,
        directory: str,
        name: str = "spool",
        *,
        busy_timeout: float = 1.0,
        owner: str | None = None,
        max_bytes: int = Settings.spool_max_bytes,
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, f"{name}.db")
        self.lock_path = os.path.join(directory, f"{name}.lock")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        _private_dir(directory)
        # The spool holds customer data until it is flushed: owner-only from the first byte,
        # and an existing file with looser modes (its -wal and -shm too) is tightened.
        _create_private(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            _private_file(self.path + suffix)
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            if owner is not None:
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('owner', ?)", (owner,))
                recorded = self._db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()[0]
                if recorded != owner:
                    raise ConfigurationError(
                        "spool_dir", f"{os.path.basename(self.path)} belongs to another app or broker; "
                        "it is not flushed from here",
                    )
        except BaseException:
            self._db.close()
            raise
        # SQLite creates them with the database file's mode; older ones are tightened above.
        for suffix in ("-wal", "-shm"):
            _private_file(self.path + suffix)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, entry: dict[str, Any], *, hold: float = 0.0) -> int:
        """Insert a message; raises SpoolFull when the cap would be passed (nothing written)."""
        now = time.time()
        text = json.dumps(entry, separators=(",", ":"))
        size = len(text.encode("utf-8", "surrogatepass"))
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO spool (created, hold_until, size, entry) SELECT ?, ?, ?, ? "
                "WHERE (SELECT bytes FROM usage WHERE id = 1) + ? <= ?",
                (now, now + hold if hold else 0.0, size, text, size, self.max_bytes),
            )
            if cur.rowcount != 1:
                used = int(self._db.execute("SELECT bytes FROM usage WHERE id = 1").fetchone()[0])
                raise SpoolFull(used, size, self.max_bytes)
        return int(cur.lastrowid or 0)

    def peek(self, limit: int = 100, *, after: int = 0) -> list[SpoolRow]:
        """Pending rows (not quarantined), oldest first, with ids above ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created, hold_until, entry, attempts, last_error FROM spool WHERE id > ? "
                "ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [SpoolRow(int(r[0]), float(r[1]), float(r[2]), json.loads(r[3]), int(r[4]), r[5]) for r in rows]

    def delete(self, row_id: int) -> bool:
        """Remove a row, pending or quarantined; False if there was none."""
        with self._lock:
            gone = self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,)).rowcount
            gone += self._db.execute("DELETE FROM quarantine WHERE id = ?", (row_id,)).rowcount
        return gone > 0

    def unhold(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE spool SET hold_until = 0 WHERE id = ?", (row_id,))

    def record_failure(self, row_id: int, error: str, max_attempts: int) -> bool:
        """Count a failed publish of a row; at ``max_attempts`` move it to quarantine (True)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error, row_id)
                )
                row = self._db.execute("SELECT attempts FROM spool WHERE id = ?", (row_id,)).fetchone()
                moved = row is not None and int(row[0]) >= max_attempts
                if moved:
                    self._db.execute(
                        "INSERT INTO quarantine (id, created, quarantined, attempts, last_error, size, entry) "
                        "SELECT id, created, ?, attempts, last_error, size, entry FROM spool WHERE id = ?",
                        (time.time(), row_id),
                    )
                    self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return moved

    def requeue(self, row_id: int) -> bool:
        """Move a quarantined row back to the pending rows with its attempts reset; False if none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # A new id at the end: its place in the order was lost when it failed.
                moved = self._db.execute(
                    "INSERT INTO spool (created, hold_until, attempts, last_error, size, entry) "
                    "SELECT created, 0, 0, NULL, size, entry FROM quarantine WHERE id = ?", (row_id,)
                ).rowcount
                self._db.execute("DELETE FROM quarantine WHERE id = ?", (row_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return moved > 0

    def rows(self) -> list[tuple[str, int, float, float, int, str | None, int, str]]:
        """(table, id, created, hold_until_or_quarantined, attempts, last_error, size, entry) of every row."""
        with self._lock:
            pending = self._db.execute(
                "SELECT 'spool', id, created, hold_until, attempts, last_error, size, entry FROM spool ORDER BY id"
            ).fetchall()
            held = self._db.execute(
                "SELECT 'quarantine', id, created, quarantined, attempts, last_error, size, entry FROM quarantine "
                "ORDER BY id"
            ).fetchall()
        return [*pending, *held]

    def depth(self) -> int:
        """Pending rows (the quarantine is not counted)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def quarantined(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])

    def usage(self) -> int:
        """Bytes of the messages held, pending and quarantined."""
        with self._lock:
            return int(self._db.execute("SELECT bytes FROM usage WHERE id = 1").fetchone()[0])

    def oldest_age(self) -> float | None:
        """Seconds the oldest pending message has waited, None when there is none."""
        with self._lock:
            row = self._db.execute("SELECT MIN(created) FROM spool").fetchone()
        return None if row[0] is None else max(0.0, time.time() - float(row[0]))

    @contextlib.contextmanager
    def flush_lock(self, *, blocking: bool = False) -> Iterator[bool]:
        """One flusher at a time across processes (``flock`` on the spool's ``.lock`` file)."""
        _create_private(self.lock_path)
        fd = os.open(self.lock_path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class SpoolFull(Exception):
    """The spool's byte cap would be passed; nothing was written."""

    def __init__(self, used: int, size: int, cap: int) -> None:
        super().__init__(f"{used} of {cap} bytes used; a {size}-byte message does not fit")
        self.used, self.size, self.cap = used, size, cap


# -- what is spooled, and what raises at the call ----------------------------------------------


class BadOption(ValueError):
    """A publish option that cannot be kept in a spooled message (raised by storable_options)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def storable_options(options: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """The message options as JSON: relative times made absolute (from ``at``, a unix time,
    default now), options Celery's ``send_task`` does not take dropped (with a warning).

    Raises :class:`BadOption` for an option the message needs that is not JSON (headers,
    a link ...): a spooled message must be the message that would have been published.
    """
    out: dict[str, Any] = {}
    now = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.timezone.utc)
    for name, value in options.items():
        if value is None:
            continue
        if name == "countdown" and _is_number(value):
            out["eta"] = (now + dt.timedelta(seconds=float(value))).isoformat()
        elif name == "expires" and _is_number(value):
            out["expires"] = (now + dt.timedelta(seconds=float(value))).isoformat()
        elif name in ("eta", "expires") and isinstance(value, dt.datetime):
            out[name] = value.isoformat()
        elif name in _PASSTHROUGH or name == "countdown":
            try:
                json.dumps(value)
            except (TypeError, ValueError, RecursionError):
                raise BadOption(name, "is not JSON-serialisable, so the message could not be kept in the spool") \
                    from None
            out[name] = value
        else:
            logger.warning("cio_celery spool: option %s is not kept for a spooled message", name)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _iso_time(value: Any) -> bool:
    if isinstance(value, dt.datetime):
        return True
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        try:
            from dateutil.parser import isoparse  # type: ignore[import-untyped]  # what Celery parses expires with

            isoparse(value)
        except (ImportError, ValueError, OverflowError):
            return False
    return True


def check_options(operation: str, options: dict[str, Any]) -> None:
    """Refuse a publish option Celery or kombu would fail on, naming it (ValidationError).

    The options a caller passes to ``apply_async`` that fail at publish with the broker
    healthy: they are the caller's to fix, and spooling them would stall the flusher.
    """

    def bad(option: str, problem: str) -> ValidationError:
        return ValidationError(operation, option, problem)

    for name in ("countdown", "time_limit", "soft_time_limit"):
        value = options.get(name)
        if value is not None and not _is_number(value):
            raise bad(name, "must be a finite number of seconds")
    expires = options.get("expires")
    if expires is not None and not (_is_number(expires) or _iso_time(expires)):
        raise bad("expires", "must be a number of seconds, a datetime or an ISO 8601 string")
    eta = options.get("eta")
    if eta is not None and not _iso_time(eta):
        raise bad("eta", "must be a datetime or an ISO 8601 string")
    priority = options.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 0 <= priority <= 255):
        raise bad("priority", "must be an int from 0 to 255")
    for name in ("queue", "routing_key", "exchange"):
        value = options.get(name)
        if value is not None and not isinstance(value, str) and not hasattr(value, "name"):
            raise bad(name, "must be a str (or a kombu Queue/Exchange)")
    headers = options.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise bad("headers", "must be a dict")
    serializer = options.get("serializer")
    if serializer is not None and (not isinstance(serializer, str) or serializer not in _serializers()):
        raise bad("serializer", f"must be an installed kombu serializer ({', '.join(sorted(_serializers()))})")
    compression = options.get("compression")
    if compression is not None and not _compression_available(compression):
        raise bad("compression", "is not an available compression (unknown, or its library is not installed)")


def _serializers() -> set[str]:
    return set(kombu_serialization.registry._encoders)


def _compression_available(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        kombu_compression.get_encoder(name)  # type: ignore[no-untyped-call]
    except KeyError:
        return False
    return True


def check_entry(app: Any, operation: str, entry: dict[str, Any]) -> None:
    """Refuse a message that could never be published, whatever the broker does.

    The task must be registered, the options valid (:func:`check_options`), and the body
    must encode with the message's serializer and compression, tried here, locally.
    Raises ValidationError (a bad option) or EnqueueError (naming the serializer or module).
    """
    task = app.tasks.get(entry["task"])
    if task is None:
        raise EnqueueError(operation, f"task {entry['task']} is not registered on this app; nothing was spooled")
    options: dict[str, Any] = entry.get("options") or {}
    check_options(operation, options)
    serializer = options.get("serializer") or getattr(task, "serializer", None) or app.conf.task_serializer
    try:
        _, _, body = kombu_serialization.dumps(  # type: ignore[no-untyped-call]
            [entry["args"], entry["kwargs"], {}], serializer=serializer
        )
    except SerializerNotInstalled:
        raise ValidationError(operation, "serializer", f"{serializer!r} is not an installed kombu serializer") from None
    except EncodeError as exc:
        cause = type(exc.__cause__ or exc).__name__
        raise EnqueueError(operation, f"the message cannot be encoded as {serializer} ({cause}); nothing was "
                           "spooled") from None
    except ImportError as exc:
        raise _import_error(operation, exc) from None
    name = options.get("compression") or app.conf.task_compression
    if name:
        if not _compression_available(name):
            raise ValidationError(operation, "compression", f"{name!r} is not available (unknown, or its library "
                                  "is not installed)")
        try:
            kombu_compression.compress(  # type: ignore[no-untyped-call]
                body if isinstance(body, bytes) else body.encode("utf-8"), name
            )
        except ImportError as exc:
            raise _import_error(operation, exc) from None


def _checked(app: Any, operation: str, entry: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``entry()`` checked by :func:`check_entry`; a bad option is a ValidationError naming it."""
    try:
        built = entry()
    except BadOption as bad:
        raise ValidationError(operation, bad.option, bad.problem) from None
    check_entry(app, operation, built)
    return built


def _import_error(operation: str, exc: ImportError) -> EnqueueError:
    module = exc.name or "a module"
    return EnqueueError(operation, f"publishing needs {module!r}, which cannot be imported ({type(exc).__name__}); "
                        "nothing was spooled")


_OUTAGE_TYPES: tuple[type[BaseException], ...] = (OperationalError, OSError)
try:  # the transports' own connection errors, where the library is installed
    import redis.exceptions as _redis_exc

    _OUTAGE_TYPES += (_redis_exc.ConnectionError, _redis_exc.TimeoutError, _redis_exc.BusyLoadingError)
except ImportError:  # pragma: no cover - redis is a dependency
    pass
try:
    import amqp.exceptions as _amqp_exc

    _OUTAGE_TYPES += (_amqp_exc.RecoverableConnectionError, _amqp_exc.ConnectionError)
except ImportError:  # pragma: no cover - amqp comes with kombu
    pass


def is_broker_outage(exc: BaseException) -> bool:
    """Whether a publish error is the broker's (unreachable, timed out, refusing): by type only.

    kombu wraps connection errors in OperationalError; sockets raise OSError (timeouts and
    refused connections included); redis-py and py-amqp have their own. An ImportError,
    an EncodeError, a ValueError from an option, a KeyError ... are not outages.
    """
    return isinstance(exc, _OUTAGE_TYPES)


def _caller_error(operation: str, exc: BaseException) -> EnqueueError:
    if isinstance(exc, ImportError):
        return _import_error(operation, exc)
    if isinstance(exc, EncodeError):
        return EnqueueError(operation, "the message cannot be encoded; nothing was spooled")
    return EnqueueError(operation, f"publish failed with {type(exc).__name__}, which is not a broker outage; "
                        "nothing was spooled")


def _publish_entry(app: Any, entry: dict[str, Any]) -> None:
    """Publish a spooled message as Celery's own ``Task.apply_async`` would (no re-validation)."""
    task = app.tasks[entry["task"]]
    Task.apply_async(task, entry["args"], entry["kwargs"], task_id=entry["task_id"], **entry["options"])


def _broker_answers(app: Any) -> bool:
    """One connection attempt, no retries: does the broker answer right now?"""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0)
        return True
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False


# -- the publisher threads ---------------------------------------------------------------------


class _Call:
    """One publish handed to a publisher thread; a lighter Future (no executor bookkeeping)."""

    __slots__ = ("_callbacks", "_event", "_lock", "ctx", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.ctx = contextvars.copy_context()
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[_Call], None]] = []
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.ctx.run(self.fn)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc
        with self._lock:
            self.done = True
            callbacks, self._callbacks = self._callbacks, []
        self._event.set()
        for callback in callbacks:
            callback(self)

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def add_done_callback(self, callback: Callable[[_Call], None]) -> None:
        with self._lock:
            if not self.done:
                self._callbacks.append(callback)
                return
        callback(self)


class _Threads:
    """A few daemon threads running publishes: a caller can stop waiting for a hung one."""

    def __init__(self, count: int) -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"cio-enqueue-{i}", daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            call.run()

    def submit(self, fn: Callable[[], Any]) -> _Call:
        call = _Call(fn)
        self._queue.put(call)
        return call

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


class SpoolingPublisher:
    """Publishes with a bounded wait; spools what the broker cannot take. One per spool and process."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.path = spool_file(app, settings)
        self._spool: Spool | None = None
        self._threads: _Threads | None = None
        self._state = threading.Lock()  # the gate, and spool writes while it is closed
        self._spool_lock = threading.Lock()
        self._open = True
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_leftover_check = 0.0

    # -- spool access ------------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            with self._spool_lock:
                if self._spool is None:
                    directory, name = os.path.split(self.path)
                    self._spool = Spool(
                        directory, name[: -len(".db")],
                        busy_timeout=max(0.1, self.settings.enqueue_timeout),
                        owner=_owner_of(self.app), max_bytes=self.settings.spool_max_bytes,
                    )
        return self._spool

    @property
    def gate_open(self) -> bool:
        return self._open

    # -- the caller's path -------------------------------------------------------------

    def publish(
        self,
        task: Any,
        task_id: str,
        entry: Callable[[], dict[str, Any]],
        send: Callable[[], Any],
        *,
        in_caller_thread: bool = False,
    ) -> Any:
        """Run ``send`` within the bound; on a broker outage, spool the message ``entry()`` describes.

        ``entry`` is only called when the message may be spooled (building it costs time on
        every call otherwise). Returns ``send``'s result, or ``task.AsyncResult(task_id)``
        when the message was spooled. A publish error that is not a broker outage raises
        here (ValidationError naming the option, or EnqueueError naming the module or
        serializer) and nothing is spooled.
        """
        operation = getattr(task, "operation", task.name)
        if self._open and time.monotonic() >= self._next_leftover_check:
            self._look_for_leftovers()
        built: dict[str, Any] | None = None
        if not self._open:
            # Checked before the spool takes it: the flusher could never publish a bad one.
            built = _checked(self.app, operation, entry)
        with self._state:
            gate_open = self._open
            if not gate_open:
                if built is None:
                    built = _checked(self.app, operation, entry)
                self._spool_entry(operation, built, None, "broker unavailable")
        if not gate_open:
            return task.AsyncResult(task_id)
        if in_caller_thread:
            try:
                return send()
            except Exception as exc:  # noqa: BLE001 - classified below
                return self._failed(task, operation, task_id, entry, exc, None)
        if self._threads is None:
            with self._spool_lock:
                if self._threads is None:
                    self._threads = _Threads(4)
        call = self._threads.submit(send)
        if not call.wait(self.settings.enqueue_timeout):
            return self._failed(task, operation, task_id, entry, None, call)
        if call.error is None:
            return call.result
        if not isinstance(call.error, Exception):
            raise call.error
        return self._failed(task, operation, task_id, entry, call.error, None)

    def _failed(
        self,
        task: Any,
        operation: str,
        task_id: str,
        entry: Callable[[], dict[str, Any]],
        error: BaseException | None,
        pending: _Call | None,
    ) -> Any:
        """A publish raised ``error`` or (None) timed out: raise it as the caller's, or spool it."""
        # A bad option or body fails with any broker, and some of them surface as broker-like
        # errors (kombu's Redis transport counts a KeyError, such as an unknown compression,
        # as a connection error): the message itself is checked first.
        built = _checked(self.app, operation, entry)
        if error is not None and not is_broker_outage(error):
            raise _caller_error(operation, error) from None
        reason = "timed out" if error is None else type(error).__name__
        if self.settings.on_broker_error == "raise":
            # After a timeout the publish is still in flight and may yet land.
            raise EnqueueError(operation, f"broker unavailable: {reason}")
        with self._state:
            was_open = self._open
            self._open = False
            self._spool_entry(operation, built, pending, reason)
        if was_open:
            logger.warning(
                "cio_celery spool: the broker did not take an operation within %.2fs (%s); "
                "operations are spooled locally until it answers",
                self.settings.enqueue_timeout, reason,
            )
        return task.AsyncResult(task_id)

    def _spool_entry(
        self, operation: str, entry: dict[str, Any], pending: _Call | None, reason: str
    ) -> None:
        try:
            row_id = self.spool.put(entry, hold=HOLD_SECONDS if pending is not None else 0.0)
        except SpoolFull as full:
            raise EnqueueError(
                operation, f"{reason}, and the local spool is full ({full.used} of {full.cap} bytes, "
                "spool_max_bytes); nothing was spooled", spooled=False,
            ) from None
        except ConfigurationError as exc:
            raise EnqueueError(
                operation, f"{reason}; the local spool cannot be used (setting {exc.setting}: {exc.problem})",
                spooled=False,
            ) from None
        except Exception as exc:  # noqa: BLE001 - disk full, permissions, locked database
            raise EnqueueError(
                operation, f"{reason}; the local spool failed too ({type(exc).__name__})", spooled=False
            ) from None
        if pending is not None:
            pending.add_done_callback(functools.partial(self._resolved, row_id))
        if not self._open:
            self._ensure_flusher()

    def _resolved(self, row_id: int, pending: _Call) -> None:
        """A publish that timed out has ended: drop its row if it landed, else free it."""
        try:
            if pending.error is None:
                self.spool.delete(row_id)
            else:
                self.spool.unhold(row_id)
        except Exception as exc:  # noqa: BLE001 - the hold expires on its own
            logger.warning("cio_celery spool: could not resolve a held row (%s)", type(exc).__name__)

    def _look_for_leftovers(self) -> None:
        self._next_leftover_check = time.monotonic() + LEFTOVER_CHECK_SECONDS
        try:
            if not os.path.exists(self.path):
                return
            if self.spool.depth() == 0:
                return
        except Exception as exc:  # noqa: BLE001
            logger.warning("cio_celery spool: could not read the spool (%s)", type(exc).__name__)
            return
        with self._state:
            self._open = False  # new operations queue behind the leftovers
            self._ensure_flusher()

    # -- flushing ----------------------------------------------------------------------

    def _ensure_flusher(self) -> None:
        # Called with self._state held.
        if self._flusher is not None and self._flusher.is_alive():
            return
        self._stop.clear()
        self._flusher = threading.Thread(target=self._flush_loop, name="cio-spool-flusher", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.flush_once()
                with self._state:
                    if self.spool.depth() == 0:
                        self._open = True
                        self._flusher = None
                        logger.warning("cio_celery spool: flushed; operations go straight to the broker again")
                        return
            except Exception as exc:  # noqa: BLE001 - keep trying; the rows are safe on disk
                logger.debug("cio_celery spool: flush attempt failed (%s)", type(exc).__name__)
            self._stop.wait(self.settings.spool_flush_interval)

    def flush_once(self, *, blocking: bool = False, limit: int | None = None) -> FlushResult:
        """Publish pending messages oldest first until none is left, the broker is down, or
        the oldest row is held by a publish still in flight. Raises the broker's error.

        A row that fails while the broker answers (probed after the failure) is counted and
        passed over; at ``spool_max_attempts`` failures it goes to the quarantine.
        """
        published = quarantined = 0
        spool = self.spool
        with spool.flush_lock(blocking=blocking) as locked:
            if not locked:
                return FlushResult(0, spool.depth())
            after = 0
            while limit is None or published < limit:
                rows = spool.peek(100 if limit is None else min(100, limit - published), after=after)
                if not rows:
                    break
                for row in rows:
                    after = row.id
                    if row.hold_until > time.time():
                        return FlushResult(published, spool.depth(), quarantined)
                    try:
                        _publish_entry(self.app, row.entry)
                    except Exception as exc:
                        if is_broker_outage(exc) and not _broker_answers(self.app):
                            raise  # the broker is down: the row keeps its place, no attempt counted
                        if spool.record_failure(row.id, type(exc).__name__, self.settings.spool_max_attempts):
                            quarantined += 1
                            logger.error(
                                "cio_celery spool: row %d (%s) failed %d times with the broker answering "
                                "(%s); it is quarantined, the rows behind it go on",
                                row.id, _operation_of(row.entry), self.settings.spool_max_attempts,
                                type(exc).__name__,
                            )
                        continue
                    spool.delete(row.id)
                    published += 1
                    if limit is not None and published >= limit:
                        break
        return FlushResult(published, spool.depth(), quarantined)

    def stop(self) -> None:
        self._stop.set()
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout=5)
        if self._threads is not None:
            self._threads.shutdown()


_PUBLISHERS: PerProcess[SpoolingPublisher] = PerProcess()


def publisher_for(app: Any, settings: Settings | None = None) -> SpoolingPublisher:
    """The process's publisher of ``app``'s spool (one per app, broker and spool directory).

    Looked up on every ``.delay()``, so keyed by the app and its (frozen) settings object:
    reading Celery's conf or hashing the file name here costs tens of microseconds. The file
    is named once, when the publisher is built; Celery's producer pool, too, keeps the broker
    URL it was first built with.
    """
    s = settings or settings_for_app(app)
    return _PUBLISHERS.get((id(app), id(s)), lambda: SpoolingPublisher(app, s))


def spool_for(app: Any) -> Spool:
    """``app``'s spool on this host (created if missing): for operators and tests."""
    return publisher_for(app).spool


def flush_spool(app: Any) -> FlushResult:
    """Publish everything pending in ``app``'s spool on this machine now, oldest first.

    Waits for a flusher running in another process to finish. Raises the broker's error if
    it still cannot take messages: what was published before is gone from the spool, the
    rest stays. Rows held by a publish in flight stay too (``remaining`` counts them); rows
    that fail with the broker answering are counted and, at ``spool_max_attempts``,
    quarantined (``quarantined``).
    """
    publisher = publisher_for(app)
    result = publisher.flush_once(blocking=True)
    if result.remaining == 0:
        with publisher._state:
            publisher._open = True
    return result


def _read_only(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)


def spool_stats(app: Any, settings: Settings | None = None) -> SpoolStats:
    """Pending rows, the oldest pending age, quarantined rows and bytes used, read-only.

    Opens a short read-only connection and never creates the spool: for health checks and
    metrics in processes that only look.
    """
    s = settings or settings_for_app(app)
    path = spool_file(app, s)
    if not os.path.exists(path):
        return SpoolStats(0, None, 0, 0, s.spool_max_bytes)
    db = _read_only(path)
    now = time.time()
    try:
        depth, oldest = db.execute("SELECT COUNT(*), MIN(created) FROM spool").fetchone()
        held = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        used = db.execute("SELECT bytes FROM usage WHERE id = 1").fetchone()[0]
        in_flight, last_hold = db.execute(
            "SELECT COUNT(*), MAX(hold_until) FROM spool WHERE hold_until > ?", (now,)).fetchone()
        failing = db.execute(
            "SELECT COUNT(*) FROM spool WHERE attempts > 0 AND hold_until <= ?", (now,)).fetchone()[0]
    finally:
        db.close()
    age = None if oldest is None else max(0.0, now - float(oldest))
    hold_left = None if last_hold is None else max(0.0, float(last_hold) - now)
    return SpoolStats(int(depth), age, int(held), int(used), s.spool_max_bytes, int(in_flight), hold_left,
                      int(failing))


def spool_depth(app: Any) -> int:
    """Messages waiting (not quarantined) in ``app``'s spool on this machine."""
    return spool_stats(app).depth


def held_depth(app: Any) -> int:
    """Pending messages of ``app``'s spool on this machine held by a publish still in flight
    (in some process of this host): a flush leaves them until the publish ends or the hold
    expires (``HOLD_SECONDS``)."""
    return spool_stats(app).held


def quarantine_depth(app: Any) -> int:
    """Messages in the quarantine of ``app``'s spool on this machine (they wait for an operator)."""
    return spool_stats(app).quarantined


def spool_usage(app: Any) -> SpoolUsage:
    """``(bytes, cap)``: the JSON bytes of the messages held (quarantine included) and
    ``spool_max_bytes``. At the cap, ``.delay()`` during an outage raises EnqueueError."""
    stats = spool_stats(app)
    return SpoolUsage(stats.bytes, stats.cap)


# -- the operator's view -------------------------------------------------------------------------


def _operation_of(entry: dict[str, Any]) -> str:
    name = str(entry.get("task", "?"))
    return name.split(".", 1)[1] if name.startswith("cio_celery.") else name


def _info(row: tuple[str, int, float, float, int, str | None, int, str], now: float) -> SpoolRowInfo:
    table, row_id, created, hold_or_when, attempts, last_error, size, text = row
    entry = json.loads(text)
    if table == "quarantine":
        state = "quarantined"
    else:
        state = "held" if hold_or_when > now else "pending"
    task_id = entry.get("task_id")
    return SpoolRowInfo(row_id, _operation_of(entry), task_id if isinstance(task_id, str) else None,
                        max(0.0, now - created), attempts, state, last_error, size)


def list_rows(app: Any) -> list[SpoolRowInfo]:
    """Every row of ``app``'s spool on this host, pending first then quarantined, oldest first.

    Ids, operation, task id, age, attempts, state, last error type and size: no customer data.
    """
    if not os.path.exists(spool_file(app)):
        return []
    now = time.time()
    return [_info(row, now) for row in spool_for(app).rows()]


def show_row(app: Any, row_id: int, *, show_data: bool = False) -> dict[str, Any] | None:
    """One row: what :func:`list_rows` shows plus its options; its arguments (customer data)
    only with ``show_data=True``. None if there is no such row."""
    if not os.path.exists(spool_file(app)):
        return None
    now = time.time()
    for row in spool_for(app).rows():
        if row[1] != row_id:
            continue
        entry = json.loads(row[7])
        out = _info(row, now).as_dict()
        options = dict(entry.get("options") or {})
        args, kwargs = entry.get("args") or [], dict(entry.get("kwargs") or {})
        meta = kwargs.pop("_cio", None)
        if show_data:
            out.update(options=options, args=args, kwargs=kwargs, meta=meta)
        else:
            # Options are the caller's publish options: headers, reprs and linked signatures
            # (their arguments) may carry data too.
            out["options"] = {k: "<hidden>" if k in {"link", "link_error"} else v for k, v in options.items()
                              if k not in {"headers", "argsrepr", "kwargsrepr"}}
            out.update(args=_hidden(len(args), "arg"), kwargs=_hidden(len(kwargs), "kwarg"))
        return out
    return None


def _hidden(n: int, word: str) -> str:
    return f"<{n} {word}{'' if n == 1 else 's'} hidden>"


def drop_row(app: Any, row_id: int) -> bool:
    """Delete one row (pending or quarantined) of ``app``'s spool; False if there was none.

    The operation is gone for good: nothing else holds it.
    """
    if not os.path.exists(spool_file(app)):
        return False
    return spool_for(app).delete(row_id)


def requeue_row(app: Any, row_id: int) -> bool:
    """Move a quarantined row back to the end of the pending rows (attempts reset); False if
    there is no such quarantined row. The app's processes on this host flush it like any
    leftover (within ``LEFTOVER_CHECK_SECONDS``), or :func:`flush_spool` does it now."""
    if not os.path.exists(spool_file(app)):
        return False
    return spool_for(app).requeue(row_id)
