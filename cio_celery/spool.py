"""A local durable spool for operations the broker could not take at enqueue.

``.delay()`` must never crash the calling app because the broker is down, and must never
lose the operation. :class:`SpoolingPublisher` publishes on a small thread pool and waits
at most ``enqueue_timeout``; on a broker error or a timeout it writes the message to a
SQLite file (WAL, ``synchronous=FULL``, mode 0600) and a background thread flushes it to
the broker, oldest first, once the broker answers again. While entries wait in the spool,
new operations of the same process queue behind them, so a process's order is kept.

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
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Task
from kombu.exceptions import EncodeError

from ._process import PerProcess
from .exceptions import EnqueueError
from .settings import Settings, settings_for_app

__all__ = [
    "FlushResult", "Spool", "SpoolRow", "SpoolingPublisher", "flush_spool", "publisher_for", "spool_depth",
    "storable_options",
]

logger = logging.getLogger("cio_celery.spool")

# Longest a row stays held for a publish that is still in flight in some process.
HOLD_SECONDS = 60.0
# How often a publisher with an open gate looks for rows another process left behind.
LEFTOVER_CHECK_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    hold_until REAL NOT NULL DEFAULT 0,
    entry TEXT NOT NULL
)
"""

# Options Celery's send_task understands that are stored with a spooled message. countdown
# and a relative expires become absolute times when the operation is spooled.
_PASSTHROUGH = frozenset({
    "queue", "routing_key", "exchange", "priority", "eta", "expires", "time_limit",
    "soft_time_limit", "argsrepr", "kwargsrepr", "headers", "shadow", "parent_id", "root_id",
    "serializer", "compression", "ignore_result", "link", "link_error", "group_id",
})


@dataclass(frozen=True)
class SpoolRow:
    id: int
    created: float
    hold_until: float
    entry: dict[str, Any]


@dataclass(frozen=True)
class FlushResult:
    published: int
    remaining: int


class Spool:
    """The SQLite file: ``spool.db`` in ``directory`` (created 0700), one row per message."""

    def __init__(self, directory: str, *, busy_timeout: float = 1.0) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "spool.db")
        self._lock = threading.Lock()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The spool holds customer data until it is flushed: owner-only from the first byte.
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, entry: dict[str, Any], *, hold: float = 0.0) -> int:
        now = time.time()
        text = json.dumps(entry, separators=(",", ":"))
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO spool (created, hold_until, entry) VALUES (?, ?, ?)",
                (now, now + hold if hold else 0.0, text),
            )
        return int(cur.lastrowid or 0)

    def peek(self, limit: int = 100) -> list[SpoolRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created, hold_until, entry FROM spool ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [SpoolRow(int(r[0]), float(r[1]), float(r[2]), json.loads(r[3])) for r in rows]

    def delete(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,))

    def unhold(self, row_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE spool SET hold_until = 0 WHERE id = ?", (row_id,))

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def oldest_age(self) -> float | None:
        """Seconds the oldest message has waited, None when the spool is empty."""
        with self._lock:
            row = self._db.execute("SELECT MIN(created) FROM spool").fetchone()
        return None if row[0] is None else max(0.0, time.time() - float(row[0]))

    @contextlib.contextmanager
    def flush_lock(self, *, blocking: bool = False) -> Iterator[bool]:
        """One flusher at a time across processes (``flock`` on ``spool.lock``)."""
        fd = os.open(os.path.join(self.directory, "spool.lock"), os.O_CREAT | os.O_RDWR, 0o600)
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


def storable_options(options: dict[str, Any], at: float | None = None) -> dict[str, Any]:
    """The message options as JSON: relative times made absolute (from ``at``, a unix time,
    default now), unknown options dropped."""
    out: dict[str, Any] = {}
    now = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.timezone.utc)
    for name, value in options.items():
        if value is None:
            continue
        if name == "countdown":
            out["eta"] = (now + dt.timedelta(seconds=float(value))).isoformat()
        elif name == "expires" and isinstance(value, (int, float)):
            out["expires"] = (now + dt.timedelta(seconds=float(value))).isoformat()
        elif name in ("eta", "expires") and isinstance(value, dt.datetime):
            out[name] = value.isoformat()
        elif name in _PASSTHROUGH:
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                logger.warning("cio_celery spool: option %s is not JSON; it is dropped from the spooled message", name)
                continue
            out[name] = value
        else:
            logger.warning("cio_celery spool: option %s is not kept for a spooled message", name)
    return out


def _publish_entry(app: Any, entry: dict[str, Any]) -> None:
    """Publish a spooled message as Celery's own ``Task.apply_async`` would (no re-validation)."""
    task = app.tasks[entry["task"]]
    Task.apply_async(task, entry["args"], entry["kwargs"], task_id=entry["task_id"], **entry["options"])


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
    """Publishes with a bounded wait; spools what the broker cannot take. One per app and process."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
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
                    self._spool = Spool(self.settings.spool_path, busy_timeout=max(0.1, self.settings.enqueue_timeout))
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
        """Run ``send`` within the bound; if it fails, spool the message ``entry()`` describes.

        ``entry`` is only called when the message is spooled (building it costs time on every
        call otherwise). Returns ``send``'s result, or ``task.AsyncResult(task_id)`` when the
        message was spooled.
        """
        operation = getattr(task, "operation", task.name)
        if self._open and time.monotonic() >= self._next_leftover_check:
            self._look_for_leftovers()
        with self._state:
            gate_open = self._open
            if not gate_open:
                self._spool_entry(operation, entry(), None, "broker unavailable")
        if not gate_open:
            return task.AsyncResult(task_id)
        if in_caller_thread:
            try:
                return send()
            except EncodeError:
                raise
            except Exception as exc:  # noqa: BLE001 - any publish failure is the broker's
                return self._failed(task, operation, task_id, entry, type(exc).__name__, None)
        if self._threads is None:
            with self._spool_lock:
                if self._threads is None:
                    self._threads = _Threads(4)
        call = self._threads.submit(send)
        if not call.wait(self.settings.enqueue_timeout):
            return self._failed(task, operation, task_id, entry, "timed out", call)
        if call.error is None:
            return call.result
        if isinstance(call.error, EncodeError) or not isinstance(call.error, Exception):
            raise call.error
        return self._failed(task, operation, task_id, entry, type(call.error).__name__, None)

    def _failed(
        self,
        task: Any,
        operation: str,
        task_id: str,
        entry: Callable[[], dict[str, Any]],
        reason: str,
        pending: _Call | None,
    ) -> Any:
        if self.settings.on_broker_error == "raise":
            # After a timeout the publish is still in flight and may yet land.
            raise EnqueueError(operation, f"broker unavailable: {reason}")
        with self._state:
            was_open = self._open
            self._open = False
            self._spool_entry(operation, entry(), pending, reason)
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
            if not os.path.exists(os.path.join(self.settings.spool_path, "spool.db")):
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
        """Publish spooled messages oldest first until the spool is empty, a publish fails,
        or the oldest row is held by a publish still in flight. Raises the broker's error."""
        published = 0
        spool = self.spool
        with spool.flush_lock(blocking=blocking) as locked:
            if not locked:
                return FlushResult(0, spool.depth())
            while limit is None or published < limit:
                rows = spool.peek(100 if limit is None else min(100, limit - published))
                if not rows:
                    break
                for row in rows:
                    if row.hold_until > time.time():
                        return FlushResult(published, spool.depth())
                    _publish_entry(self.app, row.entry)
                    spool.delete(row.id)
                    published += 1
                    if limit is not None and published >= limit:
                        break
        return FlushResult(published, spool.depth())

    def stop(self) -> None:
        self._stop.set()
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout=5)
        if self._threads is not None:
            self._threads.shutdown()


_PUBLISHERS: PerProcess[SpoolingPublisher] = PerProcess()


def publisher_for(app: Any, settings: Settings | None = None) -> SpoolingPublisher:
    s = settings or settings_for_app(app)
    return _PUBLISHERS.get((id(app), s.spool_path), lambda: SpoolingPublisher(app, s))


def flush_spool(app: Any) -> FlushResult:
    """Publish everything in ``app``'s spool on this machine now, oldest first.

    Waits for a flusher running in another process to finish. Raises the broker's error if
    it still cannot take messages: what was published before is gone from the spool, the
    rest stays. Rows held by a publish in flight stay too (``remaining`` counts them).
    """
    publisher = publisher_for(app)
    result = publisher.flush_once(blocking=True)
    if result.remaining == 0:
        with publisher._state:
            publisher._open = True
    return result


def spool_depth(app: Any) -> int:
    """Messages waiting in ``app``'s spool on this machine."""
    settings = settings_for_app(app)
    if not os.path.exists(os.path.join(settings.spool_path, "spool.db")):
        return 0
    return publisher_for(app, settings).spool.depth()
